"""Stable Diffusion XL: its config section, loading, layer presets, training loss and sampling."""
