"""`python -m dreambooth ...`: train from a JSON file or flags, run the demo.

The boundary where errors become a plain message and an exit code (2: the input is wrong,
1: the run failed), events become a progress bar and, with --events-jsonl, JSON lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from ..config import MODEL_TYPES, Concept, TrainingConfig
from ..config.errors import ConfigError, DreamboothError
from ..config.events import COMMAND_SIGNALS, CancelToken
from .ui import standalone as ui_standalone

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
    config = TrainingConfig.load(args.config) if args.config else TrainingConfig()
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
    ui_standalone.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ui":
        return ui_standalone.run(args)
    try:
        if args.command == "demo":
            from .demo import demo_config
            config = demo_config(Path(args.out), args.model_type, args.steps_per_image,
                                 lora=args.lora)
        else:
            config = config_from_args(args)
            if args.print_config:
                print(config.to_json())
                return 0
        return run_training(config, args.events_jsonl)
    except ConfigError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except DreamboothError as e:
        print(f"error: {e.message}" + (f"\n  fix: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1


def run_training(config: TrainingConfig, events_jsonl: str | None) -> int:
    from .progress import ConsoleProgress, JsonLines
    config.check()
    cancel = CancelToken()
    _install_signal_handlers(cancel)
    first = _is_first_process()  # under torchrun / accelerate launch only rank 0 reports
    jsonl = JsonLines(events_jsonl) if events_jsonl and first else None
    console = ConsoleProgress(stream=sys.stderr) if first else None
    if config.is_deterministic:
        # Intel MKL rounds multi-threaded BLAS by memory alignment unless this is set before
        # its first call; the training stack is imported only below
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    try:
        from ..training.trainer import train
        result = train(config, _fanout(console, jsonl), cancel)
    except DreamboothError:
        raise
    finally:
        if console:
            console.close()
        if jsonl:
            jsonl.close()
    if result.path and first:
        print(str(result.path))
    return 130 if result.cancelled else 0


def _is_first_process() -> bool:
    import os
    return os.environ.get("RANK", "0") == "0"


def _fanout(*listeners):
    def on_event(event):
        for listener in listeners:
            if listener is not None:
                listener(event)
    return on_event


def _install_signal_handlers(cancel: CancelToken) -> None:
    def handler(signum, frame):
        if cancel.cancelled:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        cancel.cancel()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (embedded use)
            pass
    for command, name in COMMAND_SIGNALS.items():  # POSIX: `kill -USR1 <pid>` saves now
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name),
                              lambda signum, frame, c=command: cancel.request(c))
            except ValueError:
                pass
