"""Flux.1 [dev] and [schnell]: its config section, loading, flow-matching loss and sampling."""
