"""The GUI without a toolkit: fields generated from the config schema, the edited form,
presets, run control; modules/ui/ctk/ shows it with customtkinter."""
