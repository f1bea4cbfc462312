"""The Dreambooth tab: built from a `dreambooth.host.interface.Host`, for the WebUI or standalone.

Importing this package loads nothing but the standard library; `dreambooth.host.ui.tab` imports
gradio, and nothing here imports torch. `python -m dreambooth.host.ui` (or `python -m dreambooth ui`)
serves the tab as a plain gradio app.
"""
