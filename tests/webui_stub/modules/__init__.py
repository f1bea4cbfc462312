"""Stand-in of the WebUI's `modules` package (see ../README.md)."""
