"""`python -m dreambooth ...`: train from a JSON file or flags, run the demo.

The boundary where errors become a plain message and an exit code (2: the input is wrong,
1: the run failed), events become a progress bar and, with --events-jsonl, JSON lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..config import MODEL_TYPES, Concept, TrainingConfig
from ..config import events as ev
from ..config.errors import ConfigError, DreamboothError, Problem
from ..config.runlog import failure, log_file_hint
from .runstate import Progress, apply_event, outcome
from .signals import CHILD

CONCEPT_FLAGS = {"instance_dir": "instance_data_dir", "instance_prompt": "instance_prompt",
                 "class_prompt": "class_prompt", "class_dir": "class_data_dir",
                 "class_images_per_instance": "class_images_per_instance",
                 "sample_prompt": "sample_prompt"}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


PARSERS = {"int": int, "float": float, "bool": _bool, "str": str}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainingConfig field (the concept fields through CONCEPT_FLAGS)."""
    group = parser.add_argument_group("settings (override the --config file)")
    for f in dataclasses.fields(TrainingConfig):
        if f.name == "concepts":
            continue
        choices = f.metadata.get("choices") or None
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           type=PARSERS[str(f.type)], choices=choices, help=f.metadata["help"],
                           metavar=None if choices else str(f.type).upper())
    cgroup = parser.add_argument_group("one concept from flags (instead of 'concepts' in --config)")
    for flag, name in CONCEPT_FLAGS.items():
        f = next(x for x in dataclasses.fields(Concept) if x.name == name)
        cgroup.add_argument("--" + flag.replace("_", "-"), dest="concept_" + name, default=None,
                            type=PARSERS[str(f.type)], help=f.metadata["help"])


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    from ..config.job import load_config  # + a training service's job contract
    config = load_config(args.config) if args.config else TrainingConfig()
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig)
               if f.name != "concepts" and getattr(args, f.name, None) is not None}
    concept = {name: getattr(args, "concept_" + name) for name in CONCEPT_FLAGS.values()
               if getattr(args, "concept_" + name, None) is not None}
    if concept:
        if concept.get("class_prompt") and "class_images_per_instance" not in concept:
            concept["class_images_per_instance"] = 1
        changes["concepts"] = (Concept(**concept),)
    return config.replace(**changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth",
                                     description="DreamBooth fine-tuning of Stable Diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a config file and/or flags")
    tr.add_argument("--config", help="JSON config file (the tab saves the same format)")
    tr.add_argument("--events-jsonl", help="write every event as a JSON line to FILE ('-': stdout)")
    tr.add_argument("--print-config", action="store_true",
                    help="print the resulting config as JSON and exit")
    add_config_flags(tr)
    demo = sub.add_parser("demo", help="train a tiny built-in model on sample images (CPU, ~1 min)")
    demo.add_argument("--out", default="dreambooth_demo", help="folder for everything the demo writes")
    demo.add_argument("--model-type", default="v1x", choices=MODEL_TYPES,
                      help="architecture of the tiny model")
    demo.add_argument("--lora", action="store_true", help="train a LoRA instead of the whole model")
    demo.add_argument("--steps-per-image", type=int, default=30)
    demo.add_argument("--events-jsonl", help="write every event as a JSON line to FILE ('-': stdout)")
    up = sub.add_parser("upload", help="send a run's outputs that did not reach their URL")
    up.add_argument("run", help="the model's folder, <work_dir>/<model_name>")
    configure_ui(sub.add_parser("ui", help="serve the Dreambooth tab as a web app (needs gradio)"))
    return parser


def configure_ui(parser: argparse.ArgumentParser) -> None:
    """The `ui` subcommand's options (`python -m dreambooth ui`, `python -m dreambooth.ui`)."""
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


def main(argv: Sequence[str] | None = None,
         serve: Callable[[argparse.Namespace], int] | None = None) -> int:
    """`serve`: what runs the `ui` subcommand (`dreambooth.ui.standalone.run`, given by
    `python -m dreambooth`; this stage does not import the UI)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "ui":
            return _serve(args, serve)
        return _command(args)
    except ConfigError as e:
        _say(f"error: {e.message}")
        return 2
    except DreamboothError as e:
        _say_error(e)
        return 1
    except KeyboardInterrupt:  # Ctrl-C in the UI server, or a stop at once before training
        _say("Stopped." if args.command == "ui" else
             "Stopped at once before training began, as asked; nothing was trained.")
        return 130
    except Exception as e:  # the boundary: every failure is one sentence, the traceback is logged
        _say_error(failure(e))
        return 1


def _serve(args: argparse.Namespace, serve) -> int:
    if not 0 < args.port < 65536:
        raise ConfigError([Problem("--port", args.port, "is not a port number",
                                   "give a number from 1 to 65535")])
    if serve is None:
        raise ConfigError([Problem("command", "ui", "is served by the package's entry point",
                                   "run `python -m dreambooth ui`")])
    try:
        return serve(args)
    except OSError as e:  # the port is taken, the address is not this machine's, --root is a file
        raise DreamboothError(f"The UI can't start on {args.host}:{args.port} with --root "
                              f"'{args.root}' ({e.strerror or e}).", "Choose a free --port, an "
                              "address of this machine for --host, and a folder for --root."
                              ) from None


def _command(args: argparse.Namespace) -> int:
    if args.command == "upload":
        from .storage import upload_run
        return upload_run(args.run, _say)
    if args.command == "demo":
        from .demo import demo_config
        _check_out(args.out)
        config = demo_config(Path(args.out), args.model_type, args.steps_per_image,
                             lora=args.lora)
    else:
        config = config_from_args(args)
        if args.print_config:
            print(config.to_json())
            return 0
    return run_training(config, args.events_jsonl)


def _check_out(out: str) -> None:
    why = "holds a NUL character" if "\x00" in out else None
    try:
        out.encode("utf-8")
        why = why or ("is a file, not a folder" if Path(out).exists() and not Path(out).is_dir()
                      else None)
    except (OSError, ValueError):
        why = "is not a path this system can use"
    if why:
        raise ConfigError([Problem("--out", out, why, "give a folder (created when missing)")])


def _say(text: str) -> None:
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr closed or full: the exit code still tells
        pass


def _say_error(e: DreamboothError) -> None:
    extra = log_file_hint(e)
    _say(f"error: {e.message}" + (f"\n  fix: {e.hint}" if e.hint else "")
         + (f"\n  {extra}" if extra else ""))


def run_training(config: TrainingConfig, events_jsonl: str | None) -> int:
    """Train `config` with this process's signals (dreambooth.host.signals) as its commands."""
    from .progress import JsonLines, console_progress
    from .urls import localize, send_back
    asked = config
    config, uploads = localize(config, _say)  # URLs: inputs fetched, outputs sent at the end
    config.check()
    cancel = ev.CancelToken()
    CHILD.install()  # `python -m dreambooth` did so first; a Python caller gets them here
    CHILD.attach(cancel)
    first = _is_first_process()  # under torchrun / accelerate launch only rank 0 reports
    jsonl = JsonLines(events_jsonl) if events_jsonl and first else None
    console = console_progress(sys.stderr, config.log_every_steps) if first else None
    seen = Progress()  # what this run did, for the words of a stop at once
    tracking = None
    if config.log_with != "none" and first:
        from .tracking import Tracking
        tracking = Tracking(config, _say)
    on_event = _fanout(lambda event: apply_event(seen, event), console, jsonl, tracking,
                       uploads)
    on_event(ev.Ready(os.getpid()))  # a host sends its commands from here on
    if config.is_deterministic:
        # Intel MKL rounds multi-threaded BLAS by memory alignment unless this is set before
        # its first call; the training stack is imported only below
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    failed = False
    try:
        from ..model.workdir import read_source_ahead
        read_source_ahead(config)  # read while the training stack imports (the trainer's load)
        from ..training.trainer import train
        gc.freeze()  # the training stack's ~400k objects: out of every collection's scan
        result = train(config, on_event, cancel)
    except KeyboardInterrupt:  # a second Ctrl-C, or the host's Stop now
        return _stopped_at_once(seen, jsonl, on_event)
    finally:
        CHILD.end()
        if console:
            console.close()
        if jsonl:
            jsonl.close()
        failed = uploads is not None and _uploads_failed(uploads, config)
    if first and asked is not config:
        send_back(asked, config, _say)  # class images generated for a folder at a URL
    if result.path and first:
        print(str(result.path).encode("utf-8", "backslashreplace").decode("utf-8"))
    return 1 if failed else 130 if result.cancelled else 0


def _uploads_failed(uploads, config) -> bool:
    """Wait for the uploads; name what did not arrive and the command that retries it."""
    failed = uploads.finish()
    if failed:
        _say("error: " + "; ".join(failed) + ". The local files are kept as they are.\n"
             f"  fix: python -m dreambooth upload {config.model_dir}")
    return bool(failed)


def _stopped_at_once(seen: Progress, jsonl, on_event) -> int:
    """Say what was lost and what is kept, here and (as a Stopped event) to the host."""
    seen.stop = "at_once"
    text = outcome(seen)
    if jsonl is not None:
        jsonl.new_line()  # the signal may have cut a line short
    on_event(ev.Stopped(seen.step, text))
    _say(text)
    return 130


def _is_first_process() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def _fanout(*listeners):
    live = [listener for listener in listeners if listener is not None]

    def on_event(event):
        for listener in list(live):
            try:
                listener(event)
            except DreamboothError as e:  # e.g. --events-jsonl on a full disk: said, dropped
                live.remove(listener)
                _say(f"warning: {e}")
    return on_event
