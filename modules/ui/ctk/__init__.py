"""The customtkinter view of the trainer window (the logic lives in modules/ui)."""
