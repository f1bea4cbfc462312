"""fp8_base: a frozen UNet stored in fp8 and upcast one layer at a time, as it runs.

With a LoRA (or textual inversion) the UNet's own weights never change, so they need not be kept
in the compute dtype: each Linear and Conv2d weight is stored as float8 (e4m3, one byte per
value, half of bf16) with one fp32 scale per weight (the largest value maps to fp8's largest,
448: unscaled, the many SD weights below fp8's smallest normal number, 2^-6, would lose most of
their precision). When the layer runs, its weight is upcast to the compute dtype (autocast's,
else the input's), used, and freed; backward upcasts it again from the fp8 copy instead of
keeping the upcast one, so however the step is checkpointed only one layer's upcast copy lives
at a time. Biases and norms stay in the compute dtype (they are small); LoRA layers are not
touched (they are trained, in fp32).

The cost is precision of the frozen model: a scaled e4m3 weight is within 1/16 of its value
(about 3% RMS), where bf16 is within 1/256. The LoRA learns on top of that slightly different
model; the saved LoRA file is unaffected, and the merged checkpoint (lora_merge) is merged into
the untouched full-precision weights read from the source again. kohya's `--fp8_base` makes the
same trade (there without a scale).

    place(unet, device, torch.bfloat16)   # instead of unet.to(device, torch.bfloat16)

Flux's transformer (a LoRA's frozen base, 11.9B weights: 22 GiB in bf16) is stored the same
way, 11.1 GiB; a transformer read from an fp8 file (Forge's and ComfyUI's flux1-dev-fp8, e4m3)
keeps its weights as the file has them (scale 1, exact), with no full-precision copy on the way.
SD3.5's MMDiT likewise (large: 8.1B weights, 15.0 GiB in bf16, 7.6 in fp8).

The trainer places its UNet through `place_unet` (also before it makes class images: the
upcast works in inference too, under the pipeline's autocast).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import leanfn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ADAPTER_PARTS = ("lora_A", "lora_B")  # peft's LoRA layers: trained, never stored in fp8


def applies(cfg) -> bool:
    """The run stores its UNet in fp8: fp8_base, on a UNet that does not train (validate()
    refuses fp8_base with a full fine-tune)."""
    return bool(cfg.fp8_base) and cfg.method != "dreambooth"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a layer computes in for input `x`: autocast's where it is on, else x's."""
    kind = x.device.type
    if kind == "meta":  # (the memory estimate's count: no autocast there)
        return x.dtype
    try:
        on, dtype = torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except (AttributeError, TypeError):  # torch < 2.4: one function per device type
        on, dtype = (torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()) \
            if kind == "cpu" else (torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype())
    return dtype if on else x.dtype


def upcast(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
           table: torch.Tensor | None = None) -> torch.Tensor:
    """An fp8 weight times its scale, in `dtype`. Given its `table` (a CPU layer's: `tables`),
    each byte is looked up among the 256 values the conversion makes: the same values (each
    entry is made by that conversion and multiplication), 6x faster on a CPU, which converts
    fp8 element by element (about 4 ns a value, 0.65 looked up)."""
    if table is None or table.dtype != dtype:
        return weight.to(dtype).mul_(scale)
    codes = weight.view(torch.uint8).reshape(-1).int()
    return table.index_select(0, codes).view(weight.shape)


def tables(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """A stored layer's look-up table for `dtype` (made at its first use), where its weight is
    on a CPU; None elsewhere (a GPU converts as fast as it copies: no table, no index)."""
    made = module.__dict__["_fp8_tables"]
    if made is None:
        return None
    table = made.get(dtype)
    if table is None:
        codes = torch.arange(256, dtype=torch.uint8).view(FP8)
        table = made[dtype] = codes.to(dtype).mul_(module._buffers["weight_scale"])
    return table


class _Upcast(torch.autograd.Function):
    """linear / conv2d with an fp8 weight upcast for the call: forward and backward each make
    their own upcast copy and free it, so autograd keeps only the fp8 weight (the model's own)
    and no activation (a frozen weight needs no input for its gradient). The weight, its
    scale and its table are kept on ctx, not saved for backward: they are the layer's own frozen
    tensors, never changed in place, so neither a checkpoint's hooks nor a version check need
    see them (one saved-tensor hook pair less a layer under checkpointing)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, conv, table):
        ctx.weight, ctx.scale, ctx.table = weight, scale, table
        ctx.conv, ctx.input_shape = conv, x.shape
        w = weight.to(x.dtype).mul_(scale) if table is None else \
            upcast(weight, scale, x.dtype, table)  # (no Python call where no table: a GPU)
        return F.linear(x, w, bias) if conv is None else F.conv2d(x, w, bias, *conv)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        w = ctx.weight.to(grad.dtype).mul_(ctx.scale) if ctx.table is None else \
            upcast(ctx.weight, ctx.scale, grad.dtype, ctx.table)
        if ctx.conv is None:
            dx = grad @ w
        else:
            dx = torch.nn.grad.conv2d_input(ctx.input_shape, w, grad, *ctx.conv)
        return dx, None, None, None, None, None


_apply = leanfn.lean(_Upcast)  # (about 10 Python calls a layer and step less: leanfn.py)
_MODES = hasattr(torch, "get_autocast_dtype")  # torch >= 2.4: autocast's state by device type


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward, or nn.Conv2d.forward (zero padding), over the fp8 weight
    (`weight_scale` times the stored values), in the compute dtype (compute_dtype, inline:
    this runs for every layer of every step, twice under checkpointing)."""
    kind = x.device.type
    if _MODES and kind != "meta":
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    else:
        dtype = compute_dtype(x)
    conv = None if type(self) is nn.Linear else \
        (self.stride, self.padding, self.dilation, self.groups)
    # (read from the module's dicts: nn.Module's __getattr__ is a Python call)
    weight, bias = self._parameters["weight"], self._parameters["bias"]
    if bias is not None:
        bias = bias.to(dtype)
    # (no Python call where there are no tables: a GPU)
    table = None if self.__dict__["_fp8_tables"] is None else tables(self, dtype)
    if torch._C._are_functorch_transforms_active():  # (leanfn.call, inline)
        return _Upcast.apply(x.to(dtype), weight, self._buffers["weight_scale"], bias, conv,
                             table)
    return _apply(x.to(dtype), weight, self._buffers["weight_scale"], bias, conv, table)


# The layer keeps its class (peft wraps it as any Linear / Conv2d, and makes its LoRA layers of
# that class); only its forward, an attribute of its own, changes.
FORWARDS = {nn.Linear: _forward, nn.Conv2d: _forward}


def is_stored(module: nn.Module) -> bool:
    return getattr(module, "weight_scale", None) is not None


def storable(path: str, module: nn.Module) -> bool:
    """A plain Linear / zero-padded Conv2d outside any LoRA adapter."""
    if any(part in ADAPTER_PARTS for part in path.split(".")):
        return False
    if type(module) is nn.Conv2d:
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return type(module) is nn.Linear


def store(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """One layer to `device`: its weight as fp8 with its scale, frozen; its bias in `dtype`."""
    if not is_stored(module):
        if module.weight.dtype == FP8:  # an fp8 file's weight: kept as it is (scale 1, exact;
            module.weight.data = module.weight.data.to(device)  # no full-precision copy)
            scale = torch.ones((), device=device)
        else:
            w = module.weight.detach().to(device, torch.float32)
            amax = w.abs().amax()
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            module.weight.data = (w / scale).to(FP8)
        module.register_buffer("weight_scale", scale)
        module.forward = FORWARDS[type(module)].__get__(module)
    else:  # stored already (a second placement): only moved
        module.weight.data = module.weight.data.to(device)
        module.weight_scale = module.weight_scale.to(device)
    module._fp8_tables = {} if torch.device(device).type == "cpu" else None  # see tables
    module.weight.requires_grad_(False)
    if module.bias is not None:
        module.bias.data = module.bias.data.to(device, dtype)
        module.bias.requires_grad_(False)


def place(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """`model` to `device` tensor by tensor (no full copy on either side): every storable
    layer's weight in fp8, every other floating tensor in `dtype`. Returns the layers stored."""
    stored = 0
    for path, module in model.named_modules():
        if storable(path, module):
            store(module, device, dtype)
            stored += 1
            continue
        for key, p in module._parameters.items():
            if p is not None:
                p.data = p.data.to(device, dtype if p.is_floating_point() else p.dtype)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to(device, dtype if b.is_floating_point() else b.dtype)
    return stored


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the fp8 weights in `model` (what the log and the tests look at)."""
    return sum(m.weight.numel() for m in model.modules() if is_stored(m))


def place_unet(unet: nn.Module, cfg, device: torch.device, dtype: torch.dtype, say) -> None:
    """The UNet to `device` in `dtype`, tensor by tensor (no full copy); with fp8_base, its
    Linear/Conv2d weights in fp8 (said once)."""
    if not applies(cfg):
        unet.to(device, dtype)
        return
    layers = place(unet, device, dtype)
    what = "transformer" if hasattr(unet, "transformer_blocks") else "UNet"  # (Flux, SD3.5)
    say(f"fp8_base: the {what}'s {layers} Linear/Conv2d weights are stored in fp8 "
        f"({stored_bytes(unet) / 2**30:.2f} GiB), each upcast to "
        f"{str(dtype).removeprefix('torch.')} only while its layer runs.")


def leave_out_of_sync(model: nn.Module) -> None:
    """Several processes: DDP sends every weight and buffer from the first process to the others
    when it wraps the model and the buffers before each step; the fp8 ones are the same on
    every process (read from the same source, never trained) and gloo can't send fp8 at all.
    Call after the LoRA layers are in (their wrapping changes the names) and before
    accelerate's prepare."""
    names = [f"{path}.{leaf}" for path, m in model.named_modules() if is_stored(m)
             for leaf in ("weight", "weight_scale")]
    if names:
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, names)
