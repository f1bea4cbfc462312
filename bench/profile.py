"""`python -m bench --profile`: one training step of each configuration at real size, on fake
tensors (no kernel runs, no memory is taken), counted: dispatcher ops, host syncs, peak live
bytes. Seconds per configuration on a CPU; no GPU.

The step is the trainer's own: a `Trainer` whose set-up is done here (no image folders, no
checkpoint file, no VAE/text-encoder caching: the caches are fake tensors of the right shapes),
then `Trainer.setup_optimization()` (trainable_groups, make_optimizer, the LR schedule, EMA),
`Trainer.micro_step()` (feed.batch, noise, compute_loss, LossLog.micro, backward, clipping,
optimizer step, zero_grad), `Trainer.after_update()` and `LossLog.end_update()` (the loss
stays on the device: the second step is not one that reads it); then, counted apart, the read
that every `log_every_steps`-th step adds (`LossLog.read()`). Accelerate is replaced by
what it does for one process: autocast around the model's forward, plain backward, torch's
clip_grad_norm_.

Where this differs from a CUDA step: the fake tensors live on the CPU device, because a
CPU-only torch can't run autograd over tensors that claim CUDA (its engine asks for a CUDA
device guard, streams and accelerator hooks). The trainer is told its device is "cuda";
profile_device.OnDevice maps that to the CPU and follows which tensors stand for host memory, so
the host -> device copies and device reads are still seen. But autocast follows the CPU's op
lists and attention takes the CPU SDPA kernel (its saved tensors differ from flash/efficient
attention's), so a GPU's counts will differ somewhat. The optimizer is built as on CUDA (fused
AdamW), and clipping uses foreach, torch's default on CUDA.

Beside ours, the benchmark's reference step (diffusers' train_dreambooth.py) is counted the same
way: profile_reference.py.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .profile_count import StepCounter
from .profile_device import OnDevice

GIB = 2 ** 30
FAKE_DEVICE = "cpu"  # where the fake tensors really are (see above)


@dataclass(frozen=True)
class ProfileCase:
    name: str
    settings: dict = field(default_factory=dict)  # TrainingConfig fields over the base ones
    model_type: str = "v1x"
    resolution: int = 512


def profile_cases() -> list[ProfileCase]:
    lora = {"use_lora": True, "lora_rank": 16, "lora_alpha": 16.0, "lora_learning_rate": 5e-4}
    return [ProfileCase("full_adamw_bs1"),
            ProfileCase("full_adamw_bs1_fused", {"fused_optimizer": True}),
            ProfileCase("lora_r16_bs1", lora),
            ProfileCase("lora_r16_lowest_bs1", {**lora, "memory_preset": "lowest"}),
            ProfileCase("full_adamw_bs8", {"batch_size": 8}),
            ProfileCase("text_encoder_bs1", {"train_text_encoder": True}),
            ProfileCase("bf16_weights_bs1", {"bf16_weights": True}),
            ProfileCase("lowest_bs1", {"memory_preset": "lowest"}),
            ProfileCase("ema_bs1", {"use_ema": True}),
            ProfileCase("lora_r16_ema_bs1", {**lora, "use_ema": True}),
            # selective checkpointing where the activations are most of the peak
            ProfileCase("lora_r16_selective_bs4", {**lora, "batch_size": 4,
                                                   "gradient_checkpointing": True,
                                                   "checkpoint_blocks": "selective"}),
            ProfileCase("sdxl_lora_r16_1024", lora, "sdxl", 1024),
            ProfileCase("sdxl_full_lowest_1024", {"memory_preset": "lowest"}, "sdxl", 1024)]


def network_cases() -> list[ProfileCase]:
    """One row per network type beside lora_r16_bs1, at each type's defaults (SD1.5, 512 px).
    Profiled by `python -m bench --profile`, not by the test suite (about 15 s each)."""
    lora = {"use_lora": True, "lora_rank": 16, "lora_alpha": 16.0, "lora_learning_rate": 5e-4}
    named = {"full": "network_full"}  # full_bs1 is the bench's full fine-tune
    return [ProfileCase(f"{named.get(net, net)}_bs1", {**lora, "network": net})
            for net in ("locon", "loha", "lokr", "dora", "ia3", "full", "glora", "oft")] + \
        [ProfileCase("loha_dora_bs1", {**lora, "network": "loha", "dora_wd": True})]


def flux_cases() -> list[ProfileCase]:
    """FLUX.1-dev LoRA r16 at 1024 px, full size: under the 'lowest' preset (gradient
    checkpointing, fp8_base) and as given (bf16 base, no checkpointing). Profiled by
    `python -m bench --profile --only flux_dev_lora_r16_lowest_1024`, not by the test suite
    (it profiles a 2+2 blocks deep one at full width: tests/test_flux_memory.py)."""
    lora = {"use_lora": True, "lora_rank": 16, "lora_alpha": 16.0, "lora_learning_rate": 5e-4}
    return [ProfileCase("flux_dev_lora_r16_lowest_1024", {**lora, "memory_preset": "lowest"},
                        "flux-dev", 1024),
            ProfileCase("flux_dev_lora_r16_1024", lora, "flux-dev", 1024)]


def sd35_cases() -> list[ProfileCase]:
    """SD3.5 large and medium LoRA r16 at 1024 px, full size, under the 'lowest' preset
    (gradient checkpointing, fp8_base). Profiled by `python -m bench --profile --only
    sd35_large_lora_r16_lowest_1024,sd35_medium_lora_r16_lowest_1024`, not by the test suite
    (it profiles a shorter large at full width: tests/test_sd35_memory.py)."""
    lora = {"use_lora": True, "lora_rank": 16, "lora_alpha": 16.0, "lora_learning_rate": 5e-4,
            "memory_preset": "lowest"}
    return [ProfileCase(f"sd35_{size}_lora_r16_lowest_1024", lora, f"sd3.5-{size}", 1024)
            for size in ("large", "medium")]


class _OneProcess:
    """What accelerate does for a single process with bf16/no mixed precision."""
    num_processes, process_index, is_main_process, sync_gradients = 1, 0, True, True
    distributed_type = "NO"
    step = 0

    def __init__(self, device) -> None:
        self.device = device

    def accumulate(self, *models):
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        # foreach: torch's default on CUDA (on the CPU device it would go tensor by tensor)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def prepare(self, *objs):
        return objs

    def main_process_first(self):
        return contextlib.nullcontext()


def make_config(case: ProfileCase, resolution: int, work: Path):
    from dreambooth.config import Concept, TrainingConfig
    from dreambooth.training.advice import plan_run
    settings = dict(
        model_name=f"profile_{case.name}", source_checkpoint="(fake tensors)",
        work_dir=str(work / "runs"), output_dir=str(work / "out"),
        concepts=(Concept(str(work / "instance"), "photo of sks dog", "", "", 0),),
        model_type=case.model_type, resolution=resolution, learning_rate=5e-6,
        text_encoder_learning_rate=5e-6, weight_decay=1e-2, max_grad_norm=1.0,
        lr_scheduler="constant", optimizer="adamw", mixed_precision="bf16", attention="sdpa",
        gradient_checkpointing=False, cache_latents=True, steps_per_image=100, seed=0,
        state_every_steps=0, batch_size=1)
    cfg = TrainingConfig(**{**settings, **case.settings})
    return plan_run(cfg, None, None, "bf16", lambda text: None)


def materialise(module, device, dtype):
    """Fake tensors (counted as allocated) in place of a meta module's weights and buffers;
    floating ones in `dtype` (what Trainer.setup's moves leave)."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype,
                                device=device), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.zeros(
                    b.shape, dtype=dtype if b.is_floating_point() else b.dtype, device=device)
    return module


@contextlib.contextmanager
def _lora_made_already(cfg, comp):
    """LoRA layers are injected on the meta model, before its weights become fake tensors
    (peft moves each new layer with Module.to, which can't swap a fake parameter); within,
    trainable_groups' add_lora returns those layers' parameters instead of injecting again."""
    if not cfg.use_lora:
        yield
        return
    from unittest import mock

    from dreambooth.training import adapters

    def made(comp_, cfg_):
        groups = [{"params": _lora_params(comp_.unet), "lr": cfg_.lora_learning_rate}]
        if cfg_.lora_text_encoder:
            groups.append({"params": [p for te in comp_.text_encoders for p in _lora_params(te)],
                           "lr": cfg_.lora_text_encoder_learning_rate})
        return groups
    with mock.patch.object(adapters, "add_lora", made):
        yield


def _lora_params(module) -> list:
    """The network's parameters: peft's LoRA layers, or ours (LoHa, LoKr, DoRA)."""
    from dreambooth.training.networks import PARAMS
    return [p for name, p in module.named_parameters() if ".lora_A." in name
            or ".lora_B." in name or name.rpartition(".")[2] in PARAMS]


def build_trainer(cfg, comp, device):
    """A Trainer over fake weights, set up as Trainer.setup() would have left it."""
    from dreambooth.config import events as ev
    from dreambooth.data.buckets import latent_shape
    from dreambooth.data.feed import DataFeed
    from dreambooth.data.images import Item
    from dreambooth.training import backends, fp8
    from dreambooth.training.losslog import LossLog
    from dreambooth.training.state import fresh_rng
    from dreambooth.training.trainer import Trainer
    t = Trainer(cfg, ev.EventBus(None), ev.CancelToken())
    t.acc, t.device, t.precision = _OneProcess(device), device, cfg.mixed_precision
    t.dtype, t.comp = backends.WEIGHT_DTYPES[t.precision], comp
    trained = torch.bfloat16 if cfg.bf16_weights and not cfg.use_lora else torch.float32
    t.unet_dtype = t.dtype if cfg.use_lora else trained
    materialise(comp.unet, device, t.unet_dtype)
    if fp8.applies(cfg):  # the trainer's own placement (Module.to, the plain one, can't swap a
        t.place_unet()    # fake parameter: materialise has done what it does)
    for te in comp.text_encoders if cfg.trains_text_encoder else ():  # else parked, cached
        materialise(te, device, trained).requires_grad_(False)
    t.scheduler = comp.noise_scheduler()
    feed = t.feed = DataFeed(cfg, comp, t.acc, t.dtype, t.say, t.warn)
    bucket = (cfg.resolution, cfg.resolution)
    shape = latent_shape(comp.vae.config, bucket)
    for i in range(max(cfg.batch_size, 8)):
        path = Path(f"/fake/image{i}.png")
        feed.items.append(Item(path, "photo of sks dog", False, 0))
        feed.bucket_of[path] = bucket
        feed.latents[(path, False, bucket)] = (torch.zeros(1, *shape, device=device),
                                               torch.ones(1, *shape, device=device),
                                               (*bucket, 0, 0, *bucket))
    if not cfg.trains_text_encoder:
        feed.embeddings["photo of sks dog"] = _cached_prompt(comp, device)
    t.attention = backends.apply_attention(comp, cfg.attention, t.warn)
    t.plan_steps()
    with _lora_made_already(cfg, comp):
        t.setup_optimization()
    if t.precision != "no":  # accelerate's prepare(): autocast around the forward, fp32 out
        from accelerate.utils import convert_outputs_to_fp32
        for model in t.models:
            forward = torch.autocast(FAKE_DEVICE, dtype=t.dtype)(model.forward)
            model.forward = convert_outputs_to_fp32(forward)
    t.rng, t.gen = fresh_rng(cfg.seed, FAKE_DEVICE)  # the device's generator, as in a run
    t.log = LossLog(cfg.log_every_steps)
    return t


def _cached_prompt(comp, device) -> dict:
    """A prompt's cached states: the text encoder's [77, D] (SDXL: and the pooled vector);
    Flux: T5's [tokens, 4096] and CLIP's pooled vector; SD3.5: CLIP's 77 and T5's, pooled."""
    unet = comp.configs["unet"]
    if comp.spec.flow:
        from dreambooth.training.memory_flux import text_tokens
        return {"hidden": torch.zeros(text_tokens(comp.spec.name), unet["joint_attention_dim"],
                                      device=device),
                "pooled": torch.zeros(unet["pooled_projection_dim"], device=device)}
    cond = {"hidden": torch.zeros(77, unet["cross_attention_dim"], device=device)}
    if comp.spec.family == "sdxl":
        pooled = comp.configs["text_encoder_2"]["projection_dim"]
        cond["pooled"] = torch.zeros(pooled, device=device)
    return cond


def profile_case(case: ProfileCase, resolution: int | None = None, configs: dict | None = None,
                 work: Path = Path("/nonexistent/profile"), python_calls: bool = True) -> dict:
    """One configuration: two steps (the first makes the optimizer state); the second counted
    (its Python calls too unless `python_calls` is off: 0 then; the count adds about a
    second)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dreambooth.model.components import build_meta
    from dreambooth.model.flux import build_meta_flux
    from dreambooth.model.sd35 import build_meta_sd35
    from dreambooth.training import selective
    started = time.perf_counter()
    cfg = make_config(case, resolution or case.resolution, work)
    device = torch.device("cuda")  # what the trainer is told; OnDevice maps it to FAKE_DEVICE
    build = build_meta_flux if case.model_type.startswith("flux") else \
        build_meta_sd35 if case.model_type.startswith("sd3") else build_meta
    comp = build(case.model_type, configs)
    if cfg.trains_text_encoder:  # prompts are tokenized every step
        from dreambooth import assets
        for slot in comp.spec.text_encoders:
            setattr(comp, "tokenizer" if slot.component == "text_encoder" else "tokenizer_2",
                    assets.load_tokenizer(pad_token=slot.pad_token))
    if cfg.use_lora:
        from dreambooth.training.adapters import add_lora
        add_lora(comp, cfg)  # on the meta model: see _lora_made_already
    if selective.selective(cfg):  # the blocks it recomputes, measured on the meta device
        selective.chosen_blocks(comp.configs, cfg.resolution, cfg.attention)  # (cached)
    with FakeTensorMode(allow_non_fake_inputs=True), StepCounter(python_calls) as counter, \
            OnDevice(counter):
        t = build_trainer(cfg, comp, device)
        order = list(range(len(t.feed.items)))
        steps = []
        for step in (1, 2):
            counter.start_step()
            t.micro_step(order, step - 1, step)
            t.after_update(step)
            t.log.end_update(step)  # not a step that reads the losses (log_every_steps 10)
            steps.append(counter.figures())
        top = counter.by_op.most_common(12)
        counter.start_step()
        t.log.read()  # what a step that reads them adds: one wait for all pending losses
        read = counter.figures()
    first, second = steps
    return {"name": case.name, "model_type": case.model_type, "resolution": cfg.resolution,
            "batch_size": cfg.batch_size, "ops": second["ops"],
            "python_calls": second["python_calls"]["total"],
            "python_calls_by": second["python_calls"],
            "host_syncs": second["host_syncs"], "syncs_by_kind": second["syncs_by_kind"],
            "read_syncs": read["host_syncs"], "read_ops": read["ops"],
            "peak_bytes": max(first["peak_bytes"], second["peak_bytes"]),
            "peak_gib": round(max(first["peak_bytes"], second["peak_bytes"]) / GIB, 3),
            "first_step_ops": first["ops"], "top_ops": dict(top),
            "settings": {"optimizer": t.optimizer_name, "fused": t.fused,
                         "bf16_weights": cfg.bf16_weights, "fp8_base": cfg.fp8_base,
                         "use_lora": cfg.use_lora,
                         "train_text_encoder": cfg.train_text_encoder,
                         "gradient_checkpointing": cfg.gradient_checkpointing and
                         cfg.checkpoint_blocks,
                         "mixed_precision": t.precision, "ema": cfg.use_ema,
                         "memory_preset": cfg.memory_preset},
            "seconds": round(time.perf_counter() - started, 1)}


def run_profile(only: set | None = None, resolution: int | None = None, configs=None
                ) -> list[dict]:
    from .profile_reference import comparison_cases, profile_row
    rows = []
    for case in (profile_cases() + network_cases() + flux_cases() + sd35_cases()
                 + comparison_cases()):
        if only is not None and case.name not in only:
            continue
        rows.append(profile_row(case, resolution, configs))
        print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'configuration':<22} {'ops/step':>9} {'py calls':>9} {'host syncs':>10} "
          f"{'at a read':>9} {'peak GiB':>9}  settings")


def format_row(r: dict) -> str:
    s = r["settings"]
    extra = ", ".join(k + (" (selective)" if s[k] == "selective" else "")
                      for k in ("fused", "bf16_weights", "fp8_base", "use_lora",
                                "train_text_encoder", "gradient_checkpointing", "ema")
                      if s.get(k))
    return (f"{r['name']:<22} {r['ops']:>9} {r['python_calls']:>9} {r['host_syncs']:>10} "
            f"{r['read_syncs']:>9} "
            f"{r['peak_gib']:>9.2f}  "
            f"{s['optimizer']}, bs{r['batch_size']}{', ' + extra if extra else ''} "
            f"({r['seconds']:.0f} s)")
