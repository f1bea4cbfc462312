"""LoHa, LoKr and DoRA (and through network_kinds.py (IA)3, Full, GLoRA, OFT): our own small layers
(LoRA and LoCon are peft's, lora.py), each trained as
the weight update the WebUI's built-in Lora extension (1.10.1, extensions-builtin/Lora) rebuilds
from the saved file, and saved in its key layout.

The update of a module with weight W [out, in, *k] (k: the kernel of a conv), scale s:
- LoHa: s * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) (elementwise), each a [out, r] x
  [r, in*k] product, s = alpha / r.
- LoKr: s * kron(lokr_w1, w2), lokr_w1 [out1, in1] and w2 [out2, in2, *k] with out1 * out2 = out
  and in1 * in2 = in; w2 is `lokr_w2` itself (s = 1: the WebUI knows no rank for it, so it
  ignores alpha) or `lokr_w2_a` [out2, r] @ `lokr_w2_b` [r, in2*k] (s = alpha / r).
- DoRA: V = W + s * (lora_up @ lora_down), then W' = V * dora_scale / ||V|| with the norm over
  each input column (over out and the kernel) and `dora_scale` shaped [1, in] / [1, in, 1, 1],
  the WebUI's `apply_weight_decompose` (peft's DoRA normalises each output row instead, which
  the WebUI would apply silently wrong; that is why DoRA is ours). The update is W' - W.
  Flux and SD3.5 (FLOW_TYPES): `dora_scale` [out, 1], a magnitude per output row, applied as
  Forge's `weight_decompose` (backend/patcher/lora.py, dfdcbab6; ComfyUI's) applies one of that
  shape: W' = V * dora_scale / (||W|| + eps), the norm of each row of the frozen W (not of V,
  as LyCORIS's own wd_on_out would), eps fp32's. Rows stack: BFL's / SAI's q, k, v (and a single
  block's MLP input) in one weight take their parts' rows exactly (flux_lora.py); a column's
  norm would run over all of them.
  With dora_wd, LoHa and LoKr take the same `dora_scale` over their own update (1.10.1's
  network.py applies it to any module type).

A layer keeps the frozen module as `base_layer` (the name peft uses) and its trained tensors as parameters named after their file keys (PARAMS).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config.network import targets_of
from ..config.sd35 import FLOW_TYPES
from . import network_kinds as kinds
from .lora import by_module, is_conv_target, put_module

PARAMS = {"hada_w1_a": "hada_w1_a", "hada_w1_b": "hada_w1_b", "hada_w2_a": "hada_w2_a",
          "hada_w2_b": "hada_w2_b", "lokr_w1": "lokr_w1", "lokr_w2": "lokr_w2",
          "lokr_w2_a": "lokr_w2_a", "lokr_w2_b": "lokr_w2_b", "lora_down": "lora_down.weight",
          "lora_up": "lora_up.weight", "dora_scale": "dora_scale",
          **kinds.PARAMS}  # parameter -> file key
OURS = ("loha", "lokr", "dora") + kinds.KINDS  # our layers; lora and locon are peft's (lora.py)


# -- shapes and settings ------------------------------------------------------------------------
def factorization(dim: int, factor: int) -> tuple[int, int]:
    """dim = m * n with m <= n: m = `factor` where it divides dim, else the largest divisor of
    dim up to both sqrt(dim) and `factor` (-1: no limit but sqrt(dim))."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    limit = math.isqrt(dim) if factor < 0 else min(math.isqrt(dim), factor)
    m = max(d for d in range(1, limit + 1) if dim % d == 0)
    return m, dim // m


def rank_alpha(cfg, path: str) -> tuple[int, float]:
    """The rank and alpha a module of `path` gets under cfg.network."""
    if cfg.network in kinds.KINDS:
        return kinds.rank_alpha(cfg)
    if cfg.network == "loha":
        return cfg.loha_rank, cfg.loha_alpha
    if cfg.network == "lokr":
        return cfg.lokr_rank, cfg.lokr_alpha
    if targets_of(cfg) == "transformer+conv" and is_conv_target(path):
        return cfg.lora_conv_rank, cfg.lora_conv_alpha
    return cfg.lora_rank, cfg.lora_alpha


def param_shapes(cfg, path: str, weight_shape: tuple, bias: bool = False) -> dict:
    """Parameter name -> shape of the layer cfg.network puts on a module of this weight shape
    (and bias, when it has one); {}: the type does not adapt such a module."""
    if cfg.network in kinds.KINDS:
        return kinds.shapes(cfg, path, weight_shape, bias)
    out, cin, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    rest, ones = cin * math.prod(kernel), tuple(1 for _ in kernel)
    rank, _ = rank_alpha(cfg, path)
    magnitude = (out, 1, *ones) if getattr(cfg, "model_type", "") in FLOW_TYPES \
        else (1, cin, *ones)  # per output row (Flux, SD3.5), else per input column
    dora = {"dora_scale": magnitude} if getattr(cfg, "dora_wd", False) else {}
    if cfg.network == "loha":
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, rest),
                "hada_w2_a": (out, rank), "hada_w2_b": (rank, rest), **dora}
    if cfg.network == "lokr":
        (o1, o2), (i1, i2) = factorization(out, cfg.lokr_factor), factorization(cin,
                                                                               cfg.lokr_factor)
        w2 = {"lokr_w2_a": (o2, rank), "lokr_w2_b": (rank, i2 * math.prod(kernel))} if rank \
            else {"lokr_w2": (o2, i2, *kernel)}
        return {"lokr_w1": (o1, i1), **w2, **dora}
    return {"lora_down": (rank, cin, *kernel), "lora_up": (out, rank, *ones),
            "dora_scale": magnitude}


def scale_of(params: dict, alpha: float) -> float:
    """alpha / the rank the WebUI reads off the tensors (LoHa: hada_w1_b's rows; LoKr: the
    factors' rows, none for full matrices: 1; LoRA/DoRA: lora_down's rows)."""
    if "hada_w1_b" in params:
        return alpha / params["hada_w1_b"].shape[0]
    if "lokr_w1" in params:
        return alpha / params["lokr_w2_b"].shape[0] if "lokr_w2_b" in params else 1.0
    return alpha / params["lora_down"].shape[0]


# -- the maths (pure: on the layer's parameters, a state's tensors or a file's) -----------------
class _Hadamard(torch.autograd.Function):
    """(w1a @ w1b) * (w2a @ w2b), keeping only the four factors for backward (the two
    weight-sized products are made again there)."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        g1 = grad * (w2a @ w2b)
        g2 = grad * (w1a @ w1b)
        return g1 @ w1b.T, w1a.T @ g1, g2 @ w2b.T, w2a.T @ g2


def product(params: dict) -> torch.Tensor:
    """The unscaled update as a matrix [out, in * kernel] (before DoRA)."""
    if "hada_w1_a" in params:
        return _Hadamard.apply(params["hada_w1_a"], params["hada_w1_b"], params["hada_w2_a"],
                               params["hada_w2_b"])
    if "lokr_w1" in params:
        w2 = params["lokr_w2"].flatten(1) if "lokr_w2" in params \
            else params["lokr_w2_a"] @ params["lokr_w2_b"]
        return torch.kron(params["lokr_w1"], w2)
    return params["lora_up"].flatten(1) @ params["lora_down"].flatten(1)


def column_norm(v: torch.Tensor) -> torch.Tensor:
    """||v|| over each input column: [1, in] / [1, in, 1, 1] like dora_scale."""
    return v.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, v.shape[1],
                                                            *(1 for _ in v.shape[2:]))


EPS = torch.finfo(torch.float32).eps  # Forge's, on its fp32 weight


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """||w|| over each output row, plus Forge's eps: [out, 1, ...] like a row dora_scale."""
    return w.flatten(1).norm(dim=1).reshape(w.shape[0], *(1 for _ in w.shape[1:])) + EPS


def per_row(magnitude: torch.Tensor, weight: torch.Tensor) -> bool:
    """A magnitude per output row: Forge's test (dora_scale's first size is the weight's)."""
    return magnitude.shape[0] == weight.shape[0]


def decomposed(weight: torch.Tensor, params: dict, alpha: float) -> torch.Tensor:
    """DoRA's weight W' = (W + s up@down) * dora_scale / column norm of that (per output row:
    / the frozen W's row norm, as Forge applies it)."""
    v = weight + product(params).reshape(weight.shape) * scale_of(params, alpha)
    m = params["dora_scale"]
    return v * (m / row_norm(weight)) if per_row(m, weight) else v * (m / column_norm(v))


def update(params: dict, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """What the layer adds to `weight` (fp32): the WebUI's delta for this module."""
    weight = weight.float()
    params = {k: v.float() for k, v in params.items()}
    if kinds.kind_of(params):
        return kinds.update(params, weight, alpha)
    if "dora_scale" in params:
        return decomposed(weight, params, alpha) - weight
    return product(params).reshape(weight.shape) * scale_of(params, alpha)


# -- the layer ----------------------------------------------------------------------------------
def base_weight(layer: nn.Module) -> torch.Tensor:
    """A frozen Linear/Conv2d's weight in fp32 (upcast from fp8 with its scale under fp8_base)."""
    w = layer.weight.float()
    scale = getattr(layer, "weight_scale", None)
    return w * scale if scale is not None else w


class NetworkLayer(nn.Module):
    def __init__(self, base: nn.Module, shapes: dict, alpha: float) -> None:
        super().__init__()
        self.base_layer, self.alpha = base, alpha
        self.kind = kinds.kind_of(shapes)  # ia3 / full / glora / oft (network_kinds), else None
        device = base.weight.device
        for name, shape in shapes.items():
            setattr(self, name, nn.Parameter(torch.zeros(shape, device=device)))
        self.reset()

    def params(self) -> dict:
        return {k: p for k, p in self._parameters.items() if p is not None}

    @torch.no_grad()
    def reset(self) -> None:
        """A zero update to start: LoHa's hada_w2_a, LoKr's w2 (or w2_a), DoRA's up are zero;
        DoRA's magnitude is the base's column (row) norm (network_kinds.reset: the others)."""
        p = self.params()
        kinds.reset(p)
        for name in ("lokr_w1", "lokr_w2_b", "lora_down"):
            if name in p:
                nn.init.kaiming_uniform_(p[name], a=math.sqrt(5))
        for name, std in (("hada_w1_a", 0.1), ("hada_w1_b", 1.0), ("hada_w2_b", 1.0)):
            if name in p:  # the Hadamard product of two small products: larger factors
                nn.init.normal_(p[name], std=std)
        if "dora_scale" in p:  # W' = W to start
            w = base_weight(self.base_layer)
            p["dora_scale"].copy_(row_norm(w) if per_row(p["dora_scale"], w) else column_norm(w))

    def _run(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        b = self.base_layer
        if isinstance(b, nn.Linear):
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation, b.groups)

    def effective_weight(self) -> torch.Tensor:
        w = base_weight(self.base_layer)
        return w + update(self.params(), w, self.alpha)

    def effective_bias(self) -> torch.Tensor | None:
        b, delta = self.base_layer.bias, kinds.bias_update(self.params())
        return b if delta is None else b.float() + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .fp8 import compute_dtype
        dtype, p = compute_dtype(x), self.params()
        if self.kind:
            return kinds.forward(self, x, dtype, base_weight(self.base_layer), p)
        if "dora_scale" in p:  # the whole weight: W' replaces W
            w = decomposed(base_weight(self.base_layer), p, self.alpha)
            bias = self.base_layer.bias
            return self._run(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))
        w = product(p).reshape(self.base_layer.weight.shape) * scale_of(p, self.alpha)
        return self.base_layer(x) + self._run(x.to(dtype), w.to(dtype), None)


def inject_network(module: nn.Module, paths: list[str], cfg) -> list:
    """Put cfg.network's layer on each module of `paths` in `module`; freeze the rest. Returns
    the layers' parameters, the only ones left trainable."""
    module.requires_grad_(False)
    found, params = dict(module.named_modules()), []
    for path in paths:
        base = found[path]
        shapes = param_shapes(cfg, path, tuple(base.weight.shape), base.bias is not None)
        if not shapes:
            continue
        layer = NetworkLayer(base, shapes, rank_alpha(cfg, path)[1])
        put_module(module, path, layer)
        params += list(layer.params().values())
    return params


def network_params(state: dict) -> dict:
    """module path -> {parameter name: tensor} of every network layer in a state dict."""
    return by_module(state, PARAMS)
