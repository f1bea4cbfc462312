"""`python -m dreambooth ui [--port N]`: the tab as a plain gradio app, on 127.0.0.1 by default.

Training runs exactly as in the WebUI: a child process, events streamed back.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

STYLE = Path(__file__).resolve().parents[3] / "style.css"


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the `ui` subcommand to the CLI's subparsers."""
    ui = sub.add_parser("ui", help="serve the Dreambooth tab as a web app (needs gradio)")
    configure(ui)
    return ui


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=7861, help="port to serve on (default 7861)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--root", default="dreambooth_ui",
                        help="folder for models, settings and outputs (default ./dreambooth_ui)")
    parser.add_argument("--checkpoints-dir", help="folder of source checkpoints and trained "
                        "outputs (default ROOT/models; e.g. a WebUI's models/Stable-diffusion)")
    parser.add_argument("--data-dir", help="the folder whose image folders the page and the HTTP "
                        "API may train on (default: ROOT/dreambooth, the work dir); other paths "
                        "are refused there (the CLI takes any path)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a further name this server answers to in the Host header (e.g. "
                        "its LAN name); others get 403 (default: the --host address, and "
                        "localhost names when that is a loopback address)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs training (default: this one)")
    parser.add_argument("--auth", default="", help="user:password[,user2:password2] for the "
                        "page and the HTTP API")


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the web UI needs gradio: pip install 'gradio>=3.41.2,<5'", file=sys.stderr)
        return 2
    from ..guard import allowed_names, check_auth_pairs, protect
    from ..interface import Host, standalone_paths
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
    print(f"Dreambooth UI on http://{args.host}:{args.port}  (Ctrl-C stops it)", flush=True)
    fastapi_app, _, _ = app.launch(
        server_name=args.host, server_port=args.port, auth=auth, inbrowser=False,
        allowed_paths=[str(host.paths.work_dir), str(host.paths.checkpoints_dir)],
        prevent_thread_lock=True, show_error=True)
    mount = getattr(app, "dreambooth_api", None)
    if mount is not None:
        mount(fastapi_app)
    names = allowed_names(args.host, tuple(getattr(args, "allow_host", ())))
    protect(fastapi_app, names)
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

    from ..runner import RunManager
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
        from .. import api
    except ImportError:  # no fastapi: the page still works
        return
    page.dreambooth_api = lambda app: api.mount(app, host, manager)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth ui",
                                     description="Serve the Dreambooth tab as a web app.")
    configure(parser)
    return run(parser.parse_args(argv))
