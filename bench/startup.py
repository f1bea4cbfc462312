"""Time from "Train" to the first training step, from a single-file checkpoint.

The issue's target: at most 20 s for an SD1.5 single file and 10 images (the reference, from a
ready diffusers folder, takes 25-41 s); any compile step must be optional or cached (we have
none). A randomly initialised model (the real SD1.5 architecture, or the tiny one with --smoke)
is written as an fp16 .safetensors like the files users download, with 10 synthetic images;
then dreambooth.training.trainer.train() runs from that file (latents cached, sdpa, no prior
preservation) and is cancelled at its first Step event. Clocked from the call of train():
`to_started_s` (setup: read and convert the file, move to the device, cache latents and prompts,
optimizer) and `to_first_step_s`; `load_s` and `cache_s` are the two big parts of setup.
The saves a cancelled run makes (state snapshot, checkpoint) come after the clock stops and are
skipped. Not in these numbers: the imports of the child process the WebUI starts, timed apart
in a fresh interpreter (the one that times the host's start, fresh_process_host_startup: from
its start to the end of those imports, which it makes after starting the read ahead of the
file, as the child does) as `fresh_process_imports_s`; `from_train_s` adds them. The checkpoint
was just written, so it is read from the page cache, as a second run of a user's file would be.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

TARGET_S = 20.0
ROOT = Path(__file__).resolve().parents[1]
# what the training child imports before train() runs (setup imports accelerate and diffusers)
CHILD_IMPORTS = ("import dreambooth.host.cli, dreambooth.training.trainer, accelerate; "
                 "from diffusers import AutoencoderKL, UNet2DConditionModel; "
                 "from transformers import CLIPTextModel")


def measure_startup(smoke: bool, work: Path, images: int = 10, comp=None,
                    precision: str | None = None) -> dict:
    """Write the checkpoint and images into `work`, train until the first step; the timings.
    `comp`: the model to write (built here when None); `precision`: mixed precision (default:
    bf16 on a GPU that has it, else fp16; no on a CPU)."""
    from dreambooth.config import Concept, TrainingConfig
    from dreambooth.config import events as ev
    from dreambooth.model.single_file import save_single_file
    from dreambooth.model.tiny import TINY_RESOLUTION, write_images
    from dreambooth.data.feed import DataFeed
    from dreambooth.training import trainer as trainer_module

    from .cases import build_model

    work = Path(work) / "startup"
    resolution = TINY_RESOLUTION if smoke else 512
    checkpoint = save_single_file(comp if comp is not None else build_model(smoke),
                                  work / "sd15_random.safetensors", "fp16", overwrite=True)
    folder = work / "instance"
    write_images(folder, "checker", images, size=resolution)
    cuda = torch.cuda.is_available()
    if precision is None:
        from dreambooth.training.backends import half_precision
        precision = half_precision(torch.device("cuda")) if cuda else "no"
    config = TrainingConfig(
        model_name="startup", source_checkpoint=str(checkpoint), model_type="v1x",
        work_dir=str(work / "runs"), output_dir=str(work / "out"),
        concepts=(Concept(str(folder), "photo of sks dog"),), resolution=resolution,
        steps_per_image=1, batch_size=1, cache_latents=True, attention="sdpa",
        mixed_precision=precision,
        state_every_steps=0, resume="never", save_precision="fp16", seed=0)

    marks: dict[str, float] = {}
    parts = {"load_s": 0.0, "cache_s": 0.0}
    cancel = ev.CancelToken()

    def on_event(event) -> None:
        name = {ev.Started: "started", ev.Step: "step"}.get(type(event))
        if name and name not in marks:
            if cuda:
                torch.cuda.synchronize()
            marks[name] = time.perf_counter()
            if name == "step":
                cancel.cancel()

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[key] += time.perf_counter() - t
        return wrapper

    Trainer = trainer_module.Trainer
    load = timed(trainer_module.load_model, "load_s")
    with mock.patch.object(trainer_module, "load_model", load), \
            mock.patch.object(DataFeed, "cache", timed(DataFeed.cache, "cache_s")), \
            mock.patch.object(Trainer, "snapshot", lambda self, *a, **k: None), \
            mock.patch.object(Trainer, "save", lambda self, step, final=False:
                              self.saver.output_path(step)):
        start = time.perf_counter()
        result = trainer_module.train(config, on_event, cancel)
    if "step" not in marks or not result.cancelled:
        raise RuntimeError(f"the startup run did not stop at its first step: {result}")
    loading = fresh_process_load(checkpoint)
    host_s, imports_s = fresh_process_host_startup(checkpoint, imports=True)
    loading["host_startup_s"] = round(host_s, 3)
    to_started, to_step = marks["started"] - start, marks["step"] - start
    return {"checkpoint_mb": round(checkpoint.stat().st_size / 1e6, 1), "images": images,
            "resolution": resolution, "mixed_precision": config.mixed_precision,
            "to_started_s": round(to_started, 3), "to_first_step_s": round(to_step, 3),
            "first_step_s": round(to_step - to_started, 3),
            "load_s": round(parts["load_s"], 3), "cache_s": round(parts["cache_s"], 3),
            "other_setup_s": round(to_started - parts["load_s"] - parts["cache_s"], 3),
            "fresh_process_imports_s": round(imports_s, 3),
            "from_train_s": round(imports_s + to_step, 3), "target_s": TARGET_S, **loading}


LOAD_CODE = """
import resource, sys, time
start = time.perf_counter()
import torch
from dreambooth.model.single_file import load_single_file
comp = load_single_file(sys.argv[1], sys.argv[2], None if sys.argv[3] == "stored" else torch.float32)
took = time.perf_counter() - start
sizes = {name: sum(p.numel() * p.element_size() for p in m.parameters())
         for name, m in (("unet", comp.unet), ("vae", comp.vae),
                         ("text_encoder", comp.text_encoders[0]))}
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, sizes["unet"],
      max(sizes["vae"], sizes["text_encoder"]))
"""


def fresh_process_load(checkpoint: Path, model_type: str = "v1x") -> dict:
    """A fresh interpreter that imports what loading needs and loads `checkpoint` on the host,
    in fp32 (the Python API's default; a CPU run's model) and as stored (what a GPU run holds
    before each component goes to the device in its training dtype): the seconds of the fp32
    load, and each one's peak resident memory, beside the issue's bound (1.3x the fp32 UNet
    plus the largest other component)."""
    report = {}
    for how in ("fp32", "stored"):
        out = subprocess.run([sys.executable, "-c", LOAD_CODE, str(checkpoint), model_type,
                              how], cwd=ROOT, check=True, capture_output=True, text=True,
                             timeout=600).stdout
        took, rss, unet, other = out.split()[-4:]
        if how == "fp32":
            report = {"fresh_load_s": round(float(took), 3),
                      "load_peak_rss_gb": round(int(rss) / 1e9, 2),
                      "load_rss_bound_gb": round((1.3 * int(unet) + int(other)) / 1e9, 2)}
        else:
            report["load_as_stored_peak_rss_gb"] = round(int(rss) / 1e9, 2)
    return report


HOST_CODE = """
import sys, time
start = time.perf_counter()
from dreambooth.config import Concept, TrainingConfig
from dreambooth.model.workdir import read_source_ahead
work = sys.argv[3]
config = TrainingConfig(
    model_name="startup", source_checkpoint=sys.argv[1], model_type=sys.argv[2],
    work_dir=work + "/runs", output_dir=work + "/out", concepts=(Concept(work, "photo"),),
    resolution=512, mixed_precision="auto", attention="sdpa", cache_latents=True, seed=0)
read_source_ahead(config)  # as the training child does, before its imports
exec(sys.argv[5])  # the child's imports
imported = time.time()
from accelerate import Accelerator
from dreambooth.training.advice import plan_run
from dreambooth.training.trainer import load_model
planned = plan_run(config, None, int(float(sys.argv[4]) * 2 ** 30), "bf16", lambda *a: None)
Accelerator(mixed_precision="bf16", cpu=True)
comp, _ = load_model(planned, lambda *a: None, dtype=None)
print(time.perf_counter() - start, imported)
"""


def fresh_process_host_startup(checkpoint: Path, model_type: str = "v1x",
                               free_gib: float = 24.0, imports: bool = False):
    """Seconds a fresh interpreter takes for the host's part of a GPU run's start, all that
    is not device work: the read ahead of the file, the training child's imports, the memory
    plan for a GPU with `free_gib` free, the Accelerator, and the load as stored (not the
    moves to the device, the caching of latents and prompts, or the step). With `imports`:
    (those seconds, the seconds from starting the process to the end of the child's imports,
    as fresh_process_imports times them, in the same process: one fresh start fewer)."""
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        started = time.time()  # the child reports its import end on the same clock
        out = subprocess.run([sys.executable, "-c", HOST_CODE, str(checkpoint), model_type,
                              work, str(free_gib), CHILD_IMPORTS], cwd=ROOT, check=True,
                             capture_output=True, text=True, timeout=600).stdout
    took, imported = map(float, out.split()[-2:])
    return (took, imported - started) if imports else took


def fresh_process_imports() -> float:
    """Seconds a fresh interpreter takes to start and import what the training child imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD_IMPORTS], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    return time.perf_counter() - start


def describe(r: dict) -> str:
    return (f"{'startup':<18} to first step {r['to_first_step_s']:.2f} s (setup "
            f"{r['to_started_s']:.2f} s: load {r['load_s']:.2f}, cache {r['cache_s']:.2f}; first "
            f"step {r['first_step_s']:.2f} s) + imports {r['fresh_process_imports_s']:.2f} s = "
            f"{r['from_train_s']:.2f} s from Train; target {r['target_s']:.0f} s. A fresh "
            f"process loads the file in {r['fresh_load_s']:.2f} s with imports, peak memory "
            f"{r['load_peak_rss_gb']:.2f} GB (bound {r['load_rss_bound_gb']:.2f} GB; as "
            f"stored, as a GPU run loads it: {r['load_as_stored_peak_rss_gb']:.2f} GB); "
            f"a GPU run's host work before its first step (read ahead, imports, memory plan, "
            f"load): {r['host_startup_s']:.2f} s")
