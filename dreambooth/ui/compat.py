"""The few places gradio 3.41 (AUTOMATIC1111 1.10) and gradio 4.x (Forge) differ, in one file.

Everything else the tab uses exists with the same meaning in both; tests build the tab under
each (tests/test_ui_build.py runs in a venv per gradio version).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])


def event_kwargs(streaming: bool = False) -> dict:
    """Extra arguments of .click()/.then(): gradio 4 limits each event to one run at a time
    unless told otherwise; gradio 3 has no such argument (its queue size is set at launch)."""
    if GRADIO_MAJOR >= 4 and streaming:
        return {"concurrency_limit": None}
    return {}


def queue(blocks: gr.Blocks, workers: int = 8) -> gr.Blocks:
    """Enable the queue (streaming progress needs it) with room for several events at once."""
    if GRADIO_MAJOR >= 4:
        return blocks.queue(default_concurrency_limit=workers)
    return blocks.queue(concurrency_count=workers)


def allow_paths(paths: list[Path]) -> None:
    """Let gradio 4 serve files (sample images) from our folders; gradio 3 serves any path."""
    setter = getattr(gr, "set_static_paths", None)
    if GRADIO_MAJOR >= 4 and setter is not None:
        setter(paths=[str(p) for p in paths])


def gallery(**kwargs) -> gr.Gallery:
    """A gallery of preview images: `columns` exists in both; gradio 3 wants height as px."""
    return gr.Gallery(columns=4, object_fit="contain", height=320, **kwargs)


def gallery_value(paths: list[str]) -> list:
    """File paths are a gallery value in both versions."""
    return [p for p in paths if Path(p).is_file()]
