"""Dispatch tables for the choices that depend on the machine, each with one loud fallback.

Every choice is decided by trying it (enable the backend and run it on a tiny tensor, take one
optimizer step), never by whether an import succeeds: xformers imports on a CPU but can't run.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable

import torch

from ..config.errors import DreamboothError

Say = Callable[[str], None]


# -- reproducibility ------------------------------------------------------------------------
@contextlib.contextmanager
def reproducible(deterministic: bool, cpu_threads: int, static_shapes: bool = False):
    """Within: `cpu_threads` CPU threads (0: as they are), TF32 matmuls and convolutions on a
    GPU (fp32 training at tensor-core speed), cuDNN autotuning where every batch has one shape
    (`static_shapes`: no bucketing) and, when `deterministic`, deterministic kernels (cuBLAS's
    fixed workspace, cuDNN without autotuning). Yields what decides bit-identity ({device,
    cpu_threads, deterministic}); restores everything after, so a notebook or a test suite
    goes on as it was."""
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    if torch.cuda.is_available():  # CPU matmuls stay exact fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = static_shapes
    if deterministic:
        if torch.cuda.is_available():  # read when cuBLAS makes its first handle
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CPU kernels all have a deterministic form; on a GPU a few (some attention backward
        # passes) may not: there they warn instead of stopping a run
        torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield {"device": "cuda" if torch.cuda.is_available() else "cpu",
               "cpu_threads": torch.get_num_threads(), "deterministic": deterministic}
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:4]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[4:]


# -- CPU threads ----------------------------------------------------------------------------
def free_cores(cores: int, load: float, processes: int = 1, most: int | None = None) -> int:
    """CPU threads for each of `processes` training processes on `cores` cores with a load
    average of `load`: the cores no other process is busy on (rounded half up), shared out, at
    least one, at most `most` (PyTorch's own default: the physical cores). OpenMP threads
    beyond the free cores wait for each other at every barrier while other processes hold
    their cores: on a busy 2-core machine a demo step took 2.3 s with 2 threads, 0.1 s with 1."""
    free = max(1, cores - int(load + 0.5)) // max(1, processes)
    return max(1, min(free, most) if most else free)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, and a cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period) + 0.5)))
    except (OSError, ValueError):
        pass
    return cores


def cpu_threads(configured: int, gpu: bool, say: Say) -> int:
    """The CPU threads a run computes with (0: as they are): the config's cpu_threads; on a
    GPU, or where OMP_NUM_THREADS is set, PyTorch's; else the cores free when the run starts
    (free_cores), said in the log."""
    if configured or gpu or os.environ.get("OMP_NUM_THREADS"):
        return configured
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this system: every core counts
        load = 0.0
    cores, processes = usable_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = free_cores(cores, load, processes, torch.get_num_threads())
    say(f"Training on the CPU with {threads} thread{'s' if threads > 1 else ''}: {cores} "
        f"core{'s' if cores > 1 else ''}, load average {load:.1f}"
        + (f", {processes} processes" if processes > 1 else "") + " (set cpu_threads or "
        "OMP_NUM_THREADS to choose).")
    return threads


# -- mixed precision ------------------------------------------------------------------------
def auto_precision(cfg, device: torch.device, say: Say) -> str:
    """mixed_precision 'auto': bf16 on a GPU that has it (and wherever bf16 weights need it),
    fp16 on an older GPU (fp32 with the fused optimizer, which fp16's loss scaling can't
    drive), none (fp32) on a CPU. Any other choice is kept as it is."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if cfg.bf16_weights is True:
        return "bf16"
    if device.type != "cuda":
        return "no"
    chosen = "bf16" if torch.cuda.is_bf16_supported() else \
        "no" if cfg.fused_optimizer is True else "fp16"
    say(f"Mixed precision 'auto': {'fp32' if chosen == 'no' else chosen} on this GPU.")
    return chosen


COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")  # diffusers' repeated blocks


def compile_backend() -> str:
    """inductor (generated kernels); DREAMBOOTH_COMPILE_BACKEND chooses another torch.compile
    backend (e.g. aot_eager: graph capture without code generation)."""
    return os.environ.get("DREAMBOOTH_COMPILE_BACKEND", "inductor")


def refuse_uncompilable(choice: str, device: torch.device) -> None:
    """Before training, not at the first step: inductor needs Triton on a GPU and a C++
    compiler on a CPU."""
    import importlib.util
    import shutil
    if choice == "off" or compile_backend() != "inductor":
        return
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        missing = "Triton (pip install triton)"
    elif device.type != "cuda" and not (shutil.which("g++") or shutil.which("c++")):
        missing = "a C++ compiler (apt-get install g++)"
    else:
        return
    from ..config.errors import DreamboothError
    raise DreamboothError(f"compile '{choice}' needs {missing}, which this machine lacks.",
                          "Install it, or set compile to off.")


def compile_unet(unet, choice: str, device: torch.device, say: Say) -> None:
    """compile 'blocks': each transformer and ResNet block in place (one shape compiles once
    for all its copies: a short start); 'full': the whole UNet as one graph. In place
    (nn.Module.compile): the weights keep their names, so saving, snapshots and LoRA are as
    without it. The compilation itself happens at the first step."""
    if choice == "off":
        return
    refuse_uncompilable(choice, device)
    backend = compile_backend()
    modules = [unet] if choice == "full" else \
        [m for m in unet.modules() if type(m).__name__ in COMPILED_BLOCKS]
    if choice == "blocks":
        _allow_recompiles(2 * len(modules))
    for module in modules:
        module.compile(backend=backend)
    say(f"Compiling the UNet ({choice}: {len(modules)} module(s), {backend}) at the first step; "
        "the first steps are slow.")


def _allow_recompiles(n: int) -> None:
    """Each block shape is one more compile of its class's one forward, and dynamo stops
    compiling a function after its recompile limit (8) and runs the rest of its calls eager,
    silently: the tiny UNet's ResNet blocks passed it (measured), SD1.5's have more shapes."""
    import torch._dynamo.config as config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), n))


def autocast_kwargs(cfg) -> list:
    """With gradient checkpointing, autocast's cache of half-precision weight copies would live
    through the whole forward and backward (1.3 GiB for SD1.5): recasting a weight when a block
    is recomputed costs less than keeping it."""
    from accelerate.utils import AutocastKwargs
    return [AutocastKwargs(cache_enabled=False)] if cfg.gradient_checkpointing else []


def resolve_precision(choice: str, device: torch.device, say: Say) -> str:
    """The mixed precision the device can run: fp16 needs CUDA, bf16 a GPU that has it."""
    if choice == "fp16" and device.type != "cuda":
        say("fp16 mixed precision needs a CUDA GPU; training in full precision (fp32) instead.")
        return "no"
    if choice == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        say("This GPU has no bf16; using fp16 mixed precision instead.")
        return "fp16"
    return choice


def half_precision(device: torch.device) -> str:
    """The half precision this device trains in: bf16, or fp16 on a GPU without bf16."""
    return "fp16" if device.type == "cuda" and not torch.cuda.is_bf16_supported() else "bf16"


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# -- attention ------------------------------------------------------------------------------
def _plain(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor
    unet.set_attn_processor(AttnProcessor())


def _sdpa(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())


def _xformers(unet) -> None:
    import xformers.ops  # noqa: F401  (ImportError -> fallback)
    device = next(unet.parameters()).device
    q = torch.randn(1, 4, 1, 8, device=device, dtype=torch.float16 if device.type == "cuda"
                    else torch.float32)
    xformers.ops.memory_efficient_attention(q, q, q)  # raises where it can't run (CPU)
    unet.enable_xformers_memory_efficient_attention()


ATTENTION = {"default": _plain, "sdpa": _sdpa, "xformers": _xformers}


def set_attention(unet, choice: str, say: Say) -> str:
    """Apply the attention backend; when it can't run here, say why and use SDPA. (And the
    attention modules' lean forward: leanattn.py.)"""
    from .leanattn import streamline
    streamline(unet)
    try:
        ATTENTION[choice](unet)
        return choice
    except Exception as e:  # any failure of an optional backend falls back, loudly
        if choice == "sdpa":
            raise
        say(f"Memory attention '{choice}' can't run here ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else 'unavailable'}); using SDPA instead.")
        _sdpa(unet)
        return "sdpa"


def apply_attention(comp, choice: str, say: Say) -> str:
    """The attention the working model runs: `choice` on SD's UNet (set_attention), PyTorch's
    SDPA on a flow transformer (flow_attention)."""
    return (flow_attention if comp.spec.flow else set_attention)(comp.unet, choice, say)


def flow_attention(model, choice: str, say: Say) -> str:
    """Flux's and SD3.5's transformers attend through diffusers' own processors (PyTorch's
    SDPA): another choice is said, not silently dropped."""
    if choice != "sdpa":
        say(f"Memory attention '{choice}' is for SD's UNet; this model's transformer attends "
            "through PyTorch's SDPA (set attention to 'sdpa' to silence this).")
    return "sdpa"


# -- optimizers -----------------------------------------------------------------------------
def _adamw(groups, cfg, device):
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             fused=fused or None)


_RUNS_8BIT: set = set()  # devices where bitsandbytes has taken a step


def _adamw_8bit(groups, cfg, device):
    import bitsandbytes as bnb
    if str(device) not in _RUNS_8BIT:
        probe = torch.nn.Parameter(torch.ones(64, 64, device=device))
        test = bnb.optim.AdamW8bit([probe], lr=1e-3)
        probe.grad = torch.ones_like(probe)
        test.step()  # raises where bitsandbytes can't run on this device
        _RUNS_8BIT.add(str(device))
    return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _lion(groups, cfg, device):
    try:
        from lion_pytorch import Lion
    except ImportError:
        raise DreamboothError("The 'lion' optimizer needs the lion-pytorch package.",
                              "Install it with: pip install lion-pytorch") from None
    return Lion(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _prodigy(groups, cfg, device):
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise DreamboothError("The 'prodigy' optimizer needs the prodigyopt package.",
                              "Install it with: pip install prodigyopt") from None
    return Prodigy(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _adafactor(groups, cfg, device):
    from .adafactor import Adafactor  # transformers' rule, conv weights factored as matrices
    return Adafactor(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                     foreach=torch.device(device).type == "cuda")  # (as torch's own pick)


OPTIMIZERS = {"adamw": _adamw, "adamw_8bit": _adamw_8bit, "lion": _lion, "prodigy": _prodigy,
              "adafactor": _adafactor}
FALLBACKS = {"adamw_8bit": "adamw"}


def make_optimizer(choice: str, groups: list, cfg, device: torch.device, say: Say):
    """Build the optimizer; 8-bit AdamW falls back to AdamW (said once) where it can't run."""
    try:
        return OPTIMIZERS[choice](groups, cfg, device), choice
    except DreamboothError:
        raise
    except Exception as e:  # bitsandbytes missing, or present but unable to run here
        fallback = FALLBACKS.get(choice)
        if fallback is None:
            raise
        say(f"Optimizer '{choice}' can't run here ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120] if str(e) else 'unavailable'}); using "
            f"'{fallback}' instead.")
        return OPTIMIZERS[fallback](groups, cfg, device), fallback


def optimizer_builder(choice: str, cfg, device: torch.device, say: Say):
    """(build(groups) -> optimizer, name) for optimizers made one per bucket: the choice (or its
    fallback) is settled once, on a probe weight, as make_optimizer settles it."""
    probe = [{"params": [torch.nn.Parameter(torch.zeros(1, device=device))],
              "lr": cfg.learning_rate}]
    _, name = make_optimizer(choice, probe, cfg, device, say)
    return (lambda groups: OPTIMIZERS[name](groups, cfg, device)), name


def gpu_total_memory() -> int | None:
    return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None


def vram_gb() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def release_memory() -> None:
    """Give the GPU memory of a finished, failed or cancelled run back (the models are gone),
    and the host memory of a source file read ahead that no load took (a run that stopped
    before loading)."""
    import gc

    from ..model.single_file import drop_ahead
    drop_ahead()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stored_dtypes(modules) -> dict:
    """id(module) -> the one floating dtype its weights were loaded in (None where mixed)."""
    found = {}
    for module in modules:
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        found[id(module)] = dtypes.pop() if len(dtypes) == 1 else None
    return found


def park(modules, stored: dict) -> None:
    """Frozen modules off the GPU, each back in the dtype it was loaded in (an fp16 file's VAE
    and text encoders: half the host memory of fp32; exact, as they ran in fp32 from those
    values), then the cached GPU memory released."""
    for module in modules:
        module.to("cpu", stored.get(id(module)))
    release_memory()
