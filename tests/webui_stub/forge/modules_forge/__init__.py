"""Forge's `modules_forge` package (dfdcbab6): main_entry, as the glue uses it."""
