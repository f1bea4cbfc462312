"""Forge's `backend` package (dfdcbab6): only memory_management, as the glue uses it."""
