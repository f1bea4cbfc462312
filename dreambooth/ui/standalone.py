"""`python -m dreambooth ui [--port N]`: the tab as a plain gradio app, on 127.0.0.1 by default.

Training runs exactly as in the WebUI: a child process, events streamed back.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

STYLE = Path(__file__).resolve().parents[2] / "style.css"


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web UI needs gradio: pip install 'gradio>=3.41.2,<5'", file=sys.stderr)
        return 2
    from ..host.guard import allowed_names, check_auth_pairs, protect
    from ..host.interface import Host, standalone_paths
    from . import compat
    if (why := check_auth_pairs(args.auth)):
        print(f"error: {why}", file=sys.stderr)
        return 2
    host = Host(standalone_paths(args.root, args.checkpoints_dir,
                                 data_dir=getattr(args, "data_dir", None)),
                python=args.python, api_auth=args.auth)
    for folder in (host.paths.checkpoints_dir, host.paths.work_dir, host.paths.data_dir):
        folder.mkdir(parents=True, exist_ok=True)
    app = serve(host, compat)
    auth = [tuple(pair.split(":", 1)) for pair in args.auth.split(",") if ":" in pair] or None
    fastapi_app, _, _ = app.launch(
        server_name=args.host, server_port=args.port, auth=auth, inbrowser=False,
        allowed_paths=[str(host.paths.work_dir), str(host.paths.checkpoints_dir)],
        prevent_thread_lock=True, show_error=True)
    mount = getattr(app, "dreambooth_api", None)
    if mount is not None:
        mount(fastapi_app)
    names = allowed_names(args.host, tuple(getattr(args, "allow_host", ())))
    protect(fastapi_app, names)
    # said once the guards stand (gradio serves from launch on: a page opened before this line
    # could meet its routes unguarded)
    print(f"Dreambooth UI on http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    if names is None:
        print("note: listening on every interface without --allow-host: the Host header is "
              "not checked", file=sys.stderr)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.dreambooth_manager.cancel()
        app.dreambooth_manager.wait(60)
    return 0


def serve(host, compat):
    """The tab inside a page, as the WebUI renders it: a tab with the id `tab_dreambooth`."""
    import gradio as gr

    from ..host.runner import RunManager
    from .tab import build_tab
    manager = RunManager(host)
    tab = build_tab(host, manager)
    css = STYLE.read_text(encoding="utf-8") if STYLE.is_file() else ""
    with gr.Blocks(title="Dreambooth", css=css, analytics_enabled=False) as page:
        with gr.Tabs():
            with gr.Tab("Dreambooth", elem_id="tab_dreambooth"):
                tab.blocks.render()
    page.dreambooth_tab, page.dreambooth_manager = tab, manager
    _mount_api(page, host, manager)
    return compat.queue(page)


def _mount_api(page, host, manager) -> None:
    """Add the HTTP API once gradio has created its FastAPI app (at launch)."""
    try:
        from ..host import api
    except ImportError:  # no fastapi: the page still works
        return
    page.dreambooth_api = lambda app: api.mount(app, host, manager)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dreambooth.ui [options]`: the same as `python -m dreambooth ui [options]`."""
    from ..host.cli import main as cli_main
    return cli_main(["ui", *(sys.argv[1:] if argv is None else argv)], serve=run)
