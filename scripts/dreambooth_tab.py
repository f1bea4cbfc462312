"""WebUI glue: the Dreambooth tab, its settings and its HTTP routes. Only this file imports
`modules`; everything else lives in the `dreambooth` package beside it.

The tab always renders: if our package or a dependency can't load, the tab shows a banner with
what is missing and the command that fixes it (an exception in on_ui_tabs would make the WebUI
drop the tab without a word).
"""
from __future__ import annotations

import contextlib
import html
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

from modules import call_queue, paths, script_callbacks, sd_models, shared

EXT_ROOT = Path(__file__).resolve().parent.parent
TAB = ("Dreambooth", "dreambooth")
FORGE_T5_TOKENIZER = "backend/huggingface/black-forest-labs/FLUX.1-dev/tokenizer_2"
SECTION = ("dreambooth", "Dreambooth")

try:  # the extension folder is on sys.path while the WebUI loads this file
    import dreambooth
    from dreambooth.host import interface as db_host
    from dreambooth.host import runner as db_runner
    LOAD_ERROR = ""
    if Path(dreambooth.__file__).resolve().parent.parent != EXT_ROOT:
        LOAD_ERROR = (f"Another extension's 'dreambooth' package ({dreambooth.__file__}) was "
                      "loaded instead of this one. Disable the other Dreambooth extension.")
except Exception as e:  # keep the WebUI starting; the tab explains
    LOAD_ERROR = f"The Dreambooth package could not be loaded: {type(e).__name__}: {e}"


def _opt(name: str, default=None):
    return getattr(shared.cmd_opts, name, None) or default


def _installer():
    """install.py as a module under a name no other extension uses."""
    spec = importlib.util.spec_from_file_location("dreambooth_extension_install",
                                                  EXT_ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def missing_dependencies(python: str = sys.executable) -> tuple[list[str], str]:
    """What training still needs (install.py's plan for the interpreter that trains) and the
    command that installs it."""
    fix = f'"{python}" "{EXT_ROOT / "install.py"}"'
    try:
        if os.path.abspath(python) != os.path.abspath(sys.executable):
            out = subprocess.run([python, str(EXT_ROOT / "install.py"), "--json"],
                                 capture_output=True, text=True, timeout=60)
            plan = json.loads(out.stdout.strip().splitlines()[-1])
            return plan["install"] + plan["problems"], fix if plan["install"] else ""
        installer = _installer()
        plan = installer.current_plan()
    except Exception as e:  # report, never raise: the tab must render
        return [f"install.py could not check the dependencies: {e}"], fix
    if plan.ok:
        return [], ""
    command = " ".join(f'"{c}"' if " " in c else c for c in installer.pip_command(plan))
    return plan.requirements() + plan.problems, command if plan.install else ""


class A1111Calls:
    """The seam between our host and the WebUI's model: AUTOMATIC1111's calls (v1.10) to load
    a checkpoint, to free the GPU and to reload embeddings, and the list of Flux / SD3.5 part
    files (none in 1.10). ForgeCalls answers the same questions for Forge, whose sd_models
    keeps these names with empty bodies and whose top bar lists those files."""

    name = "AUTOMATIC1111"

    def load(self, info: Any) -> None:
        """Make `info` (a CheckpointInfo, already the sd_model_checkpoint option) the model."""
        loaded = getattr(shared.sd_model, "sd_checkpoint_info", None)
        if loaded is None or loaded.filename != info.filename:
            sd_models.reload_model_weights(info=info)

    @contextlib.contextmanager
    def gpu_freed(self) -> Iterator[None]:
        """The WebUI's model on the CPU for the duration (a fork without send_model_to_cpu:
        unloaded, and reloaded after)."""
        model = shared.sd_model
        to_cpu = getattr(sd_models, "send_model_to_cpu", None)
        if model is None:
            yield
        elif to_cpu is None:
            sd_models.unload_model_weights()
            try:
                yield
            finally:
                sd_models.reload_model_weights()
        else:
            to_cpu(model)
            try:
                yield
            finally:
                sd_models.send_model_to_device(model)

    def part_files(self) -> dict[str, str] | None:
        """AUTOMATIC1111 1.10 has no Flux / SD3.5 and no list of their files: None."""
        return None

    def refresh_part_files(self) -> None:
        return None

    def selected_parts(self) -> list[str]:
        return []

    def reload_embeddings(self) -> None:
        try:  # the embedding database of the loaded model
            from modules import sd_hijack
        except ImportError:
            return
        db = getattr(getattr(sd_hijack, "model_hijack", None), "embedding_db", None)
        if db is not None:
            db.load_textual_inversion_embeddings(force_reload=True)


class ForgeCalls(A1111Calls):
    """Forge (read at lllyasviel/stable-diffusion-webui-forge dfdcbab6): a checkpoint loads at
    the next generation from modules_forge.main_entry's loading parameters, and the GPU is
    Forge's memory manager's, which loads a model back by itself when it is next used."""

    name = "Forge"

    def load(self, info: Any) -> None:
        # main_entry.checkpoint_change does nothing when the option already names the title
        # (it compares names, not what is loaded): set the parameters from the option directly
        from modules_forge import main_entry
        main_entry.refresh_model_loading_parameters()

    @contextlib.contextmanager
    def gpu_freed(self) -> Iterator[None]:
        from backend import memory_management
        memory_management.unload_all_models()
        yield  # nothing after: the next generation loads what it needs

    def part_files(self) -> dict[str, str] | None:
        """Forge's "VAE / Text Encoder" list: file name -> path of the files under models/VAE,
        models/text_encoder, --vae-dir and --text-encoder-dir, as its last refresh read them."""
        from modules_forge import main_entry
        # a copy first: Forge's refresh_models clears and refills it from another thread
        return {str(k): str(v) for k, v in list(main_entry.module_list.items())}

    def refresh_part_files(self) -> None:
        """Forge's refresh of that list (it re-reads the checkpoint list too)."""
        from modules_forge import main_entry
        main_entry.refresh_models()

    def selected_parts(self) -> list[str]:
        """The modules picked in Forge's top bar for generating (paths)."""
        return [str(m) for m in getattr(shared.opts, "forge_additional_modules", None) or []]

    def reload_embeddings(self) -> None:
        """Each text encoder of the loaded model has its own embedding database (none loaded:
        the folder is read when one is)."""
        model = shared.sd_model
        for name in [n for n in dir(model) if n.startswith("text_processing_engine")]:
            db = getattr(getattr(model, name), "embeddings", None)
            if hasattr(db, "load_textual_inversion_embeddings"):
                db.load_textual_inversion_embeddings()


def host_calls() -> A1111Calls:
    """Forge's calls where the WebUI is Forge (its sd_models loads through forge_model_reload),
    else AUTOMATIC1111's."""
    return ForgeCalls() if hasattr(sd_models, "forge_model_reload") else A1111Calls()


if not LOAD_ERROR:
    class WebUIHost(db_host.Host):
        """The WebUI as our host: its folders, its checkpoint list, its model and GPU lock."""

        name = "webui"
        cards_need_refresh = True  # no call re-reads the Lora / Textual Inversion cards

        def __init__(self) -> None:
            models = Path(paths.models_path)
            data_dir = _opt("dreambooth_data_dir")
            db_paths = db_host.HostPaths(
                checkpoints_dir=Path(_opt("ckpt_dir", sd_models.model_path)),
                lora_dir=Path(_opt("lora_dir", models / "Lora")),
                work_dir=Path(_opt("dreambooth_dir", models / "dreambooth")),
                lib_dir=EXT_ROOT / "lib", data_dir=Path(data_dir) if data_dir else None,
                embeddings_dir=Path(_opt("embeddings_dir",
                                         Path(paths.data_path) / "embeddings")))
            super().__init__(db_paths, python=_opt("dreambooth_python", sys.executable),
                             api_auth=_opt("api_auth", ""))
            self.missing, self.fix_command = missing_dependencies(self.python)
            self.calls = host_calls()
            if not isinstance(self.calls, ForgeCalls):  # 1.10 loads no Flux, no SD3.5
                self.model_types = db_host.types_without_flux()
            else:  # Forge (dfdcbab6) ships FLUX.1-dev's T5 tokenizer (tokenizer.json; SD3's
                # tokenizer_3 there is the same T5 vocabulary)
                self.t5_tokenizer_dir = str(Path(paths.script_path) / FORGE_T5_TOKENIZER)

        def list_checkpoints(self):
            return [db_host.Checkpoint(info.title, info.filename)
                    for info in sd_models.checkpoints_list.values()]

        def refresh_checkpoints(self) -> None:
            sd_models.list_models()

        def refresh_loras(self) -> None:
            networks = sys.modules.get("networks")  # the built-in Lora extension
            if networks is not None and hasattr(networks, "list_available_networks"):
                networks.list_available_networks()

        def refresh_embeddings(self) -> None:
            self.calls.reload_embeddings()

        def part_files(self) -> dict[str, str] | None:
            return self.calls.part_files()

        def refresh_part_files(self) -> None:
            self.calls.refresh_part_files()

        def selected_parts(self) -> list[str]:
            return self.calls.selected_parts()

        def select_checkpoint(self, path: str) -> str:
            info = self._info(path)
            if info is None:
                sd_models.list_models()
                info = self._info(path)
            if info is None:
                raise FileNotFoundError(f"{path} is not in the WebUI's checkpoint list")
            # AUTOMATIC1111 reloads on this change itself, taking the GPU queue: not under it
            shared.opts.set("sd_model_checkpoint", info.title)
            with call_queue.queue_lock:  # not while a generation runs
                self.calls.load(info)
            return info.title

        @staticmethod
        def _info(path: str):
            wanted = os.path.abspath(path)
            return next((i for i in sd_models.checkpoints_list.values()
                         if os.path.abspath(i.filename) == wanted), None)

        @contextlib.contextmanager
        def model_offloaded(self) -> Iterator[None]:
            """No other GPU job while training runs, and the WebUI's model off the GPU (the
            host's own calls: A1111Calls / ForgeCalls), unless --dreambooth-no-offload."""
            with call_queue.queue_lock:
                shared.state.begin(job="dreambooth")
                try:
                    if _opt("dreambooth_no_offload", False):
                        yield
                    else:
                        with self.calls.gpu_freed():
                            yield
                finally:
                    shared.state.end()

        def missing_dependencies(self) -> list[str]:
            return self.missing

        def origin_allowed(self, origin: str) -> bool:
            """The sites the WebUI's own --cors-allow-origins / --cors-allow-origins-regex
            open to its API (none by default)."""
            listed = [o.strip() for o in str(_opt("cors_allow_origins", "")).split(",")]
            if origin in listed or "*" in listed:
                return True
            try:
                return bool(_opt("cors_allow_origins_regex")) and \
                    re.fullmatch(_opt("cors_allow_origins_regex"), origin) is not None
            except re.error:
                return False


def _banner(title: str, lines: list[str], command: str = "") -> str:
    items = "".join(f"<li>{html.escape(l)}</li>" for l in lines)
    cmd = f"<pre class='dreambooth-fix'>{html.escape(command)}</pre>" if command else ""
    return (f"<div class='dreambooth-banner dreambooth-error'><b>{html.escape(title)}</b>"
            f"<ul>{items}</ul>{cmd}</div>")


def _fallback_tab(message: str, command: str = ""):
    """The tab when the real one can't be built: gradio only, nothing of ours."""
    import gradio as gr
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.HTML(_banner("The Dreambooth tab could not load.", [message], command),
                elem_id="dreambooth_banner")
    return [(blocks, *TAB)]


STATE: dict = {}  # the host and run manager of this WebUI process (survive a UI reload)


def _manager():
    if "manager" not in STATE:
        STATE["host"] = WebUIHost()
        STATE["manager"] = db_runner.MANAGERS.setdefault(str(EXT_ROOT), db_runner.RunManager(
            STATE["host"]))
        STATE["manager"].host = STATE["host"]
        STATE["manager"].cancel_grace_s = _cancel_grace  # read at each Cancel
    return STATE["host"], STATE["manager"]


def _cancel_grace() -> float:
    try:
        return max(float(getattr(shared.opts, "dreambooth_cancel_grace_s", 30)), 0.0)
    except (TypeError, ValueError):  # a value the settings file holds by hand
        return 30.0


def on_ui_tabs():
    if LOAD_ERROR:
        return _fallback_tab(LOAD_ERROR)
    try:
        from dreambooth.ui.tab import build_tab
        host, manager = _manager()
        banner = ""
        if host.missing:
            banner = _banner("Training needs packages that are not installed yet:",
                             host.missing, host.fix_command)
        return [(build_tab(host, manager, banner).blocks, *TAB)]
    except Exception as e:  # never let the WebUI drop the tab silently
        print(f"[dreambooth] the tab failed to build: {type(e).__name__}: {e}", file=sys.stderr)
        return _fallback_tab(f"{type(e).__name__}: {e}",
                             f'"{sys.executable}" "{EXT_ROOT / "install.py"}"')


def on_ui_settings():
    shared.opts.add_option("dreambooth_cancel_grace_s", shared.OptionInfo(
        30, "Cancel: seconds a training run may take to end once it has stopped after its "
        "running step and saved, before it is stopped hard (a save in progress is never cut; "
        "used from the next Cancel on)", section=SECTION))


def on_app_started(demo, app):
    """Our routes join the WebUI's API only when it serves one (--api), under its --api-auth."""
    if LOAD_ERROR or not _opt("api", False):
        return
    try:
        from dreambooth.host import api
    except ImportError as e:
        print(f"[dreambooth] HTTP API not available: {e}", file=sys.stderr)
        return
    from dreambooth.host.guard import guard_cors
    host, manager = _manager()
    api.mount(app, host, manager)
    # the WebUI's app answers CORS for the routes we add too (gradio 4's middleware lets a
    # sandboxed page, Origin 'null', read them): no allowance for another site on ours
    guard_cors(app, api.PREFIX, host.origin_allowed)


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
