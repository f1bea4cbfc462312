"""The reference in the step profile: the step of diffusers' train_dreambooth.py at its defaults
(reference.ReferenceStep, the one the timed benchmark runs), counted on fake tensors at real
size as profile.py counts ours, beside our step at the benchmark's `ours_best` settings:

    python -m bench --profile --only reference_full_bs1,ours_best_full_bs1

Same settings on both sides: SD1.5 at 512 px, bf16 mixed precision, AdamW, the full UNet,
batch 1; ours caches latents and embeddings, the reference encodes both every step. Same
stand-in for accelerate on both sides (profile._OneProcess: autocast around a prepared model's
forward, plain backward, foreach clipping as on CUDA), plus the part of prepare() only the script
asks for: its DataLoader sends each batch to the device with accelerate's own send_to_device,
blocking (accelerate's default, `DataLoaderConfiguration.non_blocking=False`). The script's
torch.optim.AdamW is set to what torch picks for CUDA weights (foreach, as ReferenceStep sets it
everywhere: gpu_path.py; its step counters stay on the host, so reading them is no sync); on
the fake tensors, which are CPU tensors, it would pick the for-loop.

The reference's host syncs per step are the real script's at these settings: three blocking
host -> device copies (the batch: pixels, token ids, attention mask) and one scalar read (the
loss, `loss.detach().item()`, for the progress bar and the log). accelerate's
clip_grad_norm_ calls torch's, which does not read the norm; the scheduler's tables come to the
device on the first step only. Not counted, on either side: host work outside the dispatcher
(decoding and resizing images, tokenizing).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .profile import FAKE_DEVICE, GIB, ProfileCase, _OneProcess, materialise
from .profile_count import StepCounter
from .profile_device import OnDevice

OURS, REFERENCE = "ours_best_full_bs1", "reference_full_bs1"
TARGET = 0.8  # issue 13: ours_best's dispatcher ops per step at most 0.8x the reference's


@dataclass(frozen=True)
class ReferenceCase:
    name: str
    model_type: str = "v1x"
    resolution: int = 512
    batch_size: int = 1


def comparison_cases() -> list:
    """Ours at the benchmark's ours_best settings (cases.our_config, best=True), and the
    reference at the same ones."""
    return [ProfileCase(OURS, {"memory_preset": "off"}), ReferenceCase(REFERENCE)]


class _ScriptProcess(_OneProcess):
    """_OneProcess, with prepare() as accelerate runs it for the script: a model's forward
    under autocast (fp32 outputs), a DataLoader's batches sent to the device."""

    def __init__(self, device, precision: str) -> None:
        super().__init__(device)
        self.mixed_precision = precision

    def prepare(self, *objs):
        return tuple(self._prepared(obj) for obj in objs)

    def _prepared(self, obj):
        from accelerate.utils import convert_outputs_to_fp32

        from .reference import WEIGHT_DTYPES
        if isinstance(obj, torch.nn.Module) and self.mixed_precision in WEIGHT_DTYPES:
            forward = torch.autocast(FAKE_DEVICE, dtype=WEIGHT_DTYPES[self.mixed_precision])
            obj.forward = convert_outputs_to_fp32(forward(obj.forward))
        elif isinstance(obj, torch.utils.data.DataLoader):
            return _SentToDevice(obj, self.device)
        return obj


class _SentToDevice:
    """A DataLoader as accelerate's DataLoaderShard runs it in one process: each batch, made
    by the loader's own sampler, dataset and collate_fn, goes through send_to_device."""

    def __init__(self, loader, device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from accelerate.utils import send_to_device
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        loader = self.loader
        with unset_fake_temporarily():  # the shuffle needs values: a fake randperm has none
            order = list(loader.batch_sampler)
        for indices in order:
            batch = loader.collate_fn([loader.dataset[i] for i in indices])
            yield send_to_device(batch, self.device, non_blocking=False)


def _placed(module, device, dtype) -> None:
    """Fake weights made where, and in the dtype, the script's moves put them; its moves
    (`module.to(device, dtype)`) then leave the module as it is (a fake parameter can't be
    swapped for a moved copy of itself)."""
    materialise(module, device, dtype)
    module.to = lambda *args, **kwargs: module


def profile_reference(case: ReferenceCase, resolution: int | None = None,
                      configs: dict | None = None) -> dict:
    """The reference's step, counted as profile.profile_case counts ours: two steps (the first
    makes the optimizer state), the second counted; the row in the same shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dreambooth import assets
    from dreambooth.model.components import build_meta

    from .cases import write_data
    from .reference import ReferenceStep
    started, size = time.perf_counter(), resolution or case.resolution
    comp = build_meta(case.model_type, configs)
    comp.tokenizer = assets.load_tokenizer(pad_token=comp.spec.text_encoders[0].pad_token)
    device = torch.device("cuda")  # what the step is told; OnDevice maps it to FAKE_DEVICE
    with tempfile.TemporaryDirectory(prefix="dreambooth_profile_") as tmp:
        data = write_data(Path(tmp), size)
        with FakeTensorMode(allow_non_fake_inputs=True), StepCounter() as counter, \
                OnDevice(counter):
            _placed(comp.unet, device, torch.float32)  # trained: fp32, autocast
            for frozen in (comp.vae, comp.text_encoder):  # the script casts them to bf16
                _placed(frozen, device, torch.bfloat16)
            ref = ReferenceStep(comp, data, case.batch_size, False, False, "bf16",
                                acc=_ScriptProcess(device, "bf16"))
            steps = []
            for _ in (1, 2):
                counter.start_step()
                ref.step()  # the loss read is part of each step here
                steps.append(counter.figures())
            top = counter.by_op.most_common(12)
    return _row(case, size, steps, top, ref, time.perf_counter() - started)


def _row(case, size: int, steps: list, top: list, ref, seconds: float) -> dict:
    first, second = steps
    peak = max(first["peak_bytes"], second["peak_bytes"])
    return {"name": case.name, "model_type": case.model_type, "resolution": size,
            "batch_size": case.batch_size, "ops": second["ops"],
            "python_calls": second["python_calls"]["total"],
            "python_calls_by": second["python_calls"],
            "host_syncs": second["host_syncs"], "syncs_by_kind": second["syncs_by_kind"],
            "read_syncs": 0, "read_ops": 0,  # its loss read is in every step, counted above
            "peak_bytes": peak, "peak_gib": round(peak / GIB, 3),
            "first_step_ops": first["ops"], "top_ops": dict(top),
            "settings": {"script": ref.script, "optimizer": "torch.optim.AdamW (foreach)",
                         "fused": False, "bf16_weights": False, "use_lora": bool(ref.lora),
                         "train_text_encoder": ref.train_te, "gradient_checkpointing": False,
                         "mixed_precision": "bf16", "ema": False, "memory_preset": "-",
                         "latents": "VAE every step", "text": "text encoder every step"},
            "seconds": round(seconds, 1)}


def profile_row(case, resolution: int | None = None, configs: dict | None = None) -> dict:
    """One row of the profile, ours or the reference's."""
    from .profile import profile_case
    if isinstance(case, ReferenceCase):
        return profile_reference(case, resolution, configs)
    return profile_case(case, resolution, configs)


def comparison(rows: list[dict]) -> dict | None:
    """ours_best's figures over the reference's, where both rows were profiled."""
    by_name = {r["name"]: r for r in rows}
    if OURS not in by_name or REFERENCE not in by_name:
        return None
    ours, ref = by_name[OURS], by_name[REFERENCE]
    return {"ours": OURS, "reference": REFERENCE,
            "ops_ratio": round(ours["ops"] / ref["ops"], 3), "ops_target": TARGET,
            "python_calls": [ours["python_calls"], ref["python_calls"]],
            "python_calls_ratio": round(ours["python_calls"] / ref["python_calls"], 3),
            "host_syncs": [ours["host_syncs"], ref["host_syncs"]],
            "peak_ratio": round(ours["peak_bytes"] / ref["peak_bytes"], 3)}


def describe(c: dict) -> str:
    ok = "within" if c["ops_ratio"] <= c["ops_target"] else "above"
    return (f"{c['ours']} / {c['reference']}: dispatcher ops x{c['ops_ratio']:.3f} ({ok} the "
            f"target x{c['ops_target']}), Python calls {c['python_calls'][0]} vs "
            f"{c['python_calls'][1]} (x{c['python_calls_ratio']:.3f}; target x1), host syncs "
            f"{c['host_syncs'][0]} vs "
            f"{c['host_syncs'][1]}, peak memory x{c['peak_ratio']:.3f}")
