"""The Dreambooth tab: built from a `dreambooth.host.interface.Host`, for the WebUI or standalone.

Importing this package loads nothing but the standard library; `dreambooth.ui.tab` imports
gradio, and nothing here imports torch. `python -m dreambooth.ui` (or `python -m dreambooth ui`)
serves the tab as a plain gradio app.

In: a `Host` (`dreambooth.host.interface`: its folders, checkpoint list, refresh) and the page's
widget values, hostile until checked (`dreambooth.host.confine`). Out: a `TrainingConfig` handed
to the host's `RunManager`, and the run's progress, previews, loss chart and checkpoints shown.
The only stage that imports gradio; above `host`, nothing imports it but `__main__` and the
WebUI glue (`scripts/dreambooth_tab.py`).
"""
