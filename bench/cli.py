"""`python -m bench [--smoke] [--json FILE] [--steps N] [--rounds R] [--only NAMES]
[--no-startup]`; `python -m bench --profile [--only NAMES] [--json FILE]` (no GPU needed);
`python -m bench --save-memory [--smoke] [--json FILE]` (a save's peak RSS; no GPU needed);
`python -m bench --gpu-probe [--json FILE]` (one short pass over everything on a GPU)."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import types
import time
from pathlib import Path

import torch

from . import cases as C
from .measure import Clock, count_flops, device_name, peak_tflops, release

RUNS = ("reference", "ours_same", "ours_best", "ours_lowest")
GB = 1e9
PROBE_BUDGET_S = 7 * 60  # --gpu-probe starts no configuration after this: done within 8 minutes


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="tiny model at 64 px (automatic when there is no CUDA GPU)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--steps", type=int, help="timed steps per run (default: 2 smoke, 30 GPU)")
    p.add_argument("--rounds", type=int, help="the runs alternate in this many rounds "
                                              "(default: 2 smoke, 3 GPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per run first (default: 1 / 3)")
    p.add_argument("--profile", action="store_true",
                   help="count one training step of each configuration at real size on fake "
                        "tensors (dispatcher ops, host syncs, peak live memory); no GPU needed")
    p.add_argument("--gpu-probe", action="store_true",
                   help="one short pass on a CUDA GPU: start-up and every configuration (10 "
                        "steps each), the JSON rewritten after each one (default gpu_probe.json) "
                        "so a cut-short run keeps its rows, each peak beside its estimate; "
                        "starts nothing after 7 minutes")
    p.add_argument("--save-memory", action="store_true",
                   help="peak resident memory of saving a full SD1.5 fine-tune as one file "
                        "(tiny with --smoke), each in a fresh process; no GPU needed")
    p.add_argument("--only", help="comma-separated configurations to run, 'startup' among "
                                  "them for the startup time (default: all)")
    p.add_argument("--startup", action=argparse.BooleanOptionalAction, default=None,
                   help="time from 'Train' to the first step from a single-file checkpoint "
                        "(default: on, or with --only when 'startup' is listed)")
    p.add_argument("--precision", choices=("no", "fp16", "bf16"),
                   help="mixed precision (default: bf16 where the device has it, else fp16; "
                        "all runs share one, as accelerate keeps one per process)")
    args = p.parse_args(argv)
    if args.gpu_probe:
        args.steps, args.rounds = args.steps or 10, args.rounds or 2
        args.warmup = args.warmup if args.warmup is not None else 2
        args.json = args.json or "gpu_probe.json"
    args.forced_smoke = not args.smoke and not torch.cuda.is_available()
    args.smoke = args.smoke or args.forced_smoke
    args.steps = args.steps or (2 if args.smoke else 30)
    args.rounds = max(1, min(args.rounds or (2 if args.smoke else 3), args.steps))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    if args.precision is None:  # what the 'lowest' memory preset trains in, on every device
        from dreambooth.training.backends import half_precision
        args.precision = half_precision(torch.device("cuda" if torch.cuda.is_available()
                                                     else "cpu"))
    return args


def build_runs(case, base, data, work: Path, precision: str) -> dict:
    from .ours import OursStep
    from .reference import ReferenceStep
    from .reference_sdxl import SDXLReferenceStep
    reference = SDXLReferenceStep if case.model_type == "sdxl" else ReferenceStep
    return {
        "reference": lambda: reference(_copied(base), data, case.batch_size,
                                       case.train_text_encoder, case.prior, precision,
                                       case.lora_rank),
        "ours_same": lambda: OursStep("ours_same", _copied(base),
                                      C.our_config(case, data, work, precision, best=False)),
        "ours_best": lambda: OursStep("ours_best", _copied(base),
                                      C.our_config(case, data, work, precision, best=True)),
        "ours_lowest": lambda: OursStep("ours_lowest", _copied(base), C.our_config(
            case, data, work, precision, best=True, preset="lowest")),
    }


def _copied(base):
    """A run's own copy of the model; the tokenizers shared (no run changes them: a deep copy
    of CLIP's vocabulary took a third of each copy's time)."""
    shared = {id(v): v for k, v in vars(base).items() if k.startswith("tokenizer")}
    return copy.deepcopy(base, shared)


def run_case(case, base, data, work: Path, args) -> dict:
    """Set up the runs one after another, then time them alternating, in rounds; only the run
    being timed is on the GPU, so each one's peak memory is its own. A case marked `alone`
    builds, times and closes each run in turn (all steps in one round)."""
    home = "cuda" if torch.cuda.is_available() else "cpu"  # parking is a no-op on a CPU
    runners, clocks, flops, losses = {}, {}, {}, {}
    for name, build in build_runs(case, base, data, work, args.precision).items():
        runner = runners[name] = build()
        for _ in range(args.warmup):
            runner.step()
        flops[name] = count_flops(runner.step)
        clocks[name] = Clock()
        if case.alone:  # timed now, then only what the report needs is kept
            losses[name] = clocks[name].time(runner.step, args.steps)
            runners[name] = _Done(runner)
            runner.close()
            del runner
        else:
            runner.to("cpu")
        release()
    per_round = [args.steps // args.rounds + (r < args.steps % args.rounds)
                 for r in range(args.rounds)] if not case.alone else []
    for r, n in enumerate(per_round):
        for name in (RUNS if r % 2 == 0 else tuple(reversed(RUNS))):
            runners[name].to(home)
            losses[name] = clocks[name].time(runners[name].step, n)
            runners[name].to("cpu")
            release()
    result = {name: metrics(case, clocks[name], flops[name], runners[name], losses[name])
              for name in RUNS}
    for name in RUNS[1:]:  # ours: the memory estimate the 'auto' preset plans with, beside it
        from dreambooth.training.memory import estimate
        guess = estimate(runners[name].trainer.cfg).total / GB
        result[name]["estimate_gb"] = round(guess, 3)
        result[name]["measured_vs_estimate"] = round(
            result[name]["peak_allocated_gb"] / guess, 3) if guess else None
    for name in RUNS:
        result[name]["ratio_to_reference"] = round(
            result[name]["steps_per_s"] / result["reference"]["steps_per_s"], 3)
        runners[name].close()
    return result


class _Done:
    """A run already timed and closed: its settings and config, without its model."""

    def __init__(self, runner) -> None:
        self._settings = runner.settings()
        if hasattr(runner, "trainer"):  # ours: the config the estimate is made from
            self.trainer = types.SimpleNamespace(cfg=runner.trainer.cfg)

    def settings(self) -> dict:
        return self._settings

    def close(self) -> None:
        pass


def metrics(case, clock: Clock, flops: int, runner, loss: float) -> dict:
    steps_per_s = clock.steps_per_s()
    tflops = flops * steps_per_s / 1e12
    peak = peak_tflops(device_name())
    return {"steps_per_s": round(steps_per_s, 4),
            "images_per_s": round(steps_per_s * case.images_per_step, 4),
            "steps": clock.steps, "seconds": round(clock.seconds, 4),
            "peak_allocated_gb": round(clock.peak_allocated / GB, 3),
            "peak_reserved_gb": round(clock.peak_reserved / GB, 3),
            "flops_per_step": flops, "tflops": round(tflops, 4),
            "fraction_of_bf16_peak": round(tflops / peak, 4) if peak else None,
            "last_loss": loss, "settings": runner.settings()}


def header(args) -> dict:
    import diffusers
    import transformers
    name = device_name()
    return {"benchmark": "dreambooth training step", "smoke": args.smoke, "device": name,
            "device_bf16_peak_tflops": peak_tflops(name), "precision": args.precision,
            "resolution": C.TINY if args.smoke else 512,  # SD1.5's; each configuration's below
            "steps_per_run": args.steps,
            "rounds": args.rounds, "warmup": args.warmup, "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "images_per_step": "images through the UNet (instance + class with prior)",
            "timing": "synchronised wall time" if torch.cuda.is_available() else
            "median of the CPU seconds per step of each timed block (time.process_time)"}


def main(argv=None) -> int:
    args = parse(argv)
    if args.profile:
        return profile_main(args)
    if args.save_memory:
        return save_memory_main(args)
    if args.gpu_probe and not torch.cuda.is_available():
        print("--gpu-probe measures a CUDA GPU and this machine has none. Run it where there "
              "is one, or use 'python -m bench --profile' (counts, no GPU).", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if not torch.cuda.is_available():  # CPU: denormals from random init slow steps 10-30x
        torch.set_flush_denormal(True)
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32"
    if args.forced_smoke:
        print("No CUDA GPU: running the smoke size (tiny model, 64 px); timings are not "
              "meaningful.", file=sys.stderr)
    if not torch.cuda.is_available():
        print("Timing: the median of each block's CPU seconds per step (this process's own "
              "time); --rounds as large as --steps alternates the runs step by step.",
              file=sys.stderr)
    only = set(args.only.split(",")) if args.only else None
    report = header(args)
    report["configurations"] = []
    started = time.perf_counter()
    models, data = C.Models(args.smoke), {}
    with tempfile.TemporaryDirectory(prefix="dreambooth_bench_") as tmp:
        # first, before training steps have warmed the GPU up (kernels, allocator), as in the
        # child process a click on Train starts
        if args.startup if args.startup is not None else only is None or "startup" in only:
            from .startup import describe, measure_startup
            report["startup"] = measure_startup(args.smoke, Path(tmp), comp=models.get("v1x"),
                                                precision=args.precision)
            print(describe(report["startup"]), flush=True)
            release()
        for case in C.cases():
            if only is not None and case.name not in only:
                continue
            size = C.TINY if args.smoke else case.resolution
            entry = {"name": case.name, "model_type": case.model_type, "resolution": size,
                     "batch_size": case.batch_size,
                     "train_text_encoder": case.train_text_encoder,
                     "prior_preservation": case.prior, "lora_rank": case.lora_rank}
            if case.skip:
                entry.update(status="skipped", reason=case.skip)
            elif args.gpu_probe and time.perf_counter() - started > PROBE_BUDGET_S:
                entry.update(status="skipped", reason="not run: past the probe's time budget")
            else:
                if size not in data:
                    data[size] = C.write_data(Path(tmp) / f"images_{size}", size)
                entry.update(status="ok", runs=run_case(case, models.get(case.model_type),
                                                        data[size], Path(tmp), args))
            report["configurations"].append(entry)
            print_entry(entry)
            write_report(report, args, started)  # after each one: a cut-short run keeps rows
    write_report(report, args, started)
    return 0


def write_report(report: dict, args, started: float) -> None:
    report["seconds"] = round(time.perf_counter() - started, 2)
    if args.json:
        path = Path(args.json)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(path)


def print_entry(entry: dict) -> None:
    if entry["status"] != "ok":
        print(f"{entry['name']:<18} skipped: {entry['reason']}", flush=True)
        return
    for name, r in entry["runs"].items():
        frac = r["fraction_of_bf16_peak"]
        print(f"{entry['name']:<18} {name:<10} {r['steps_per_s']:8.3f} steps/s "
              f"({1000 / r['steps_per_s']:7.1f} ms) "
              f"{r['images_per_s']:8.3f} img/s  x{r['ratio_to_reference']:<6.2f} "
              f"peak {r['peak_allocated_gb']:6.2f}/{r['peak_reserved_gb']:6.2f} GB  "
              f"{r['tflops']:8.3f} TFLOP/s  "
              f"{'%5.1f%%' % (100 * frac) if frac is not None else '   n/a'} of peak"
              + (f"  (estimate {r['estimate_gb']:.2f} GB)" if "estimate_gb" in r else ""),
              flush=True)
        shown = {k: v for k, v in r["settings"].items() if k != "messages"}
        print(f"{'':<18} {'':<10} settings: "
              + ", ".join(f"{k}={v}" for k, v in shown.items()), flush=True)


def save_memory_main(args) -> int:
    from .save_memory import describe, measure_save_memory
    smoke = args.smoke and not args.forced_smoke  # a host measure: real size on any machine
    with tempfile.TemporaryDirectory(prefix="dreambooth_bench_") as tmp:
        rows = measure_save_memory(smoke, Path(tmp))
    for row in rows:
        print(describe(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"save_memory": rows}, indent=2) + "\n",
                                   encoding="utf-8")
    return 0 if all(r["within_bound"] for r in rows) else 1


def profile_main(args) -> int:
    from .profile import HEADER, run_profile
    from .profile_reference import comparison, describe
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    only = set(args.only.split(",")) if args.only else None
    print("Step profile: one training step per configuration on fake tensors at real size "
          "(SD1.5 at 512 px, SDXL at 1024): counted, not timed; no GPU involved.")
    print(HEADER, flush=True)
    started = time.perf_counter()
    rows = run_profile(only)
    ratio = comparison(rows)
    if ratio is not None:
        print(describe(ratio), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"benchmark": "dreambooth step profile (fake tensors)", "torch": torch.__version__,
             "seconds": round(time.perf_counter() - started, 1), "configurations": rows,
             "comparison": ratio}, indent=2))
    return 0
