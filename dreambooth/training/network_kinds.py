"""(IA)3, Full, GLoRA and OFT: the rest of the network family the WebUI's built-in Lora extension
(1.10.1: network_ia3.py, network_full.py, network_glora.py, network_oft.py, network.py) loads,
each trained as the weight (and bias) that code rebuilds from the saved file. Pure maths on a
layer's parameters, a state's tensors or a file's; networks.py holds the layer and the registry.

For a module with weight W [out, in, *k] and bias b (multiplier 1; no alpha / rank scale for any
of them: the WebUI reads no rank off these tensors, so `calc_scale` is 1):
- ia3: W' = W + W * w, w [out] scaling each output row (`on_input` False), or w [in] each input
  column (`on_input` True: the feed-forward's second layer, as the (IA)3 paper scales the FF
  activation). Linear only: the WebUI's broadcast does not fit a conv's weight. The bias is not
  scaled (LyCORIS's own forward scales the output with it; the WebUI does not).
- full: W' = W + diff, b' = b + diff_b (diff_b only where the module has a bias, and never on a
  text encoder's q / k / v projection: for OpenCLIP's fused attention (SD 2.x, SDXL's second
  encoder) the WebUI applies their weights to in_proj_weight but drops their ex_bias).
- glora: W' = W + b2 @ b1 + (W @ a2) @ a1 with a1 [r, in], a2 [in, r], b1 [r, in], b2 [out, r]
  (LyCORIS's first GLoRA layout, the one the WebUI's formula fits; Linear only, since W @ a2
  needs a matrix). The WebUI ignores alpha here (no dim), Forge scales by alpha / r: the file
  holds alpha = r so that both apply scale 1.
- oft: Q = B - B^T per block of `oft_blocks` [k, n, n] (k * n = out); with alpha > 0 Q is scaled
  so that ||Q|| (over all blocks) <= alpha * out; R = (I + Q)(I - Q)^-1; each block of n output
  rows of W becomes R^T @ rows (the WebUI's einsum 'k n m, k n ... -> k m ...'); the bias is not
  turned (kohya's OFT turns the whole output, bias included; the WebUI merges into W only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("ia3", "full", "glora", "oft")
HAS_ALPHA = ("glora", "oft")  # the others' files hold no .alpha (the WebUI would not read it)
PARAMS = {"ia3_out": "weight", "ia3_in": "weight", "diff": "diff", "diff_b": "diff_b",
          "glora_a1": "a1.weight", "glora_a2": "a2.weight", "glora_b1": "b1.weight",
          "glora_b2": "b2.weight", "oft_blocks": "oft_blocks"}  # parameter -> file key
ON_INPUT = ("ff.net.2", "mlp.fc2")  # the feed-forward's second layer: (IA)3 scales its input
NO_DIFF_B = ("q_proj", "k_proj", "v_proj")  # the WebUI drops these biases' change (see above)


def largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def shapes(cfg, path: str, weight_shape: tuple, bias: bool) -> dict:
    """Parameter name -> shape of cfg.network's layer on this module ({}: not adapted)."""
    out, cin, linear = weight_shape[0], weight_shape[1], len(weight_shape) == 2
    if cfg.network == "ia3":
        if not linear:
            return {}
        return {"ia3_in": (cin,)} if path.endswith(ON_INPUT) else {"ia3_out": (out,)}
    if cfg.network == "full":
        bias = bias and not path.endswith(tuple("." + n for n in NO_DIFF_B))  # (not
        # Flux's / SD3.5's add_q_proj: their change is applied)
        return {"diff": tuple(weight_shape), **({"diff_b": (out,)} if bias else {})}
    if cfg.network == "glora":
        r = cfg.glora_rank
        return {"glora_a1": (r, cin), "glora_a2": (cin, r), "glora_b1": (r, cin),
                "glora_b2": (out, r)} if linear else {}
    n = largest_divisor(out, cfg.oft_block_size)
    return {"oft_blocks": (out // n, n, n)}


def rank_alpha(cfg) -> tuple[int, float]:
    """(ss_network_dim, the file's alpha) of these types."""
    if cfg.network == "glora":
        return cfg.glora_rank, float(cfg.glora_rank)
    if cfg.network == "oft":
        return cfg.oft_block_size, float(cfg.oft_constraint)
    return 0, 0.0


def kind_of(params: dict) -> str | None:
    for name, kind in (("ia3_out", "ia3"), ("ia3_in", "ia3"), ("diff", "full"),
                       ("glora_a1", "glora"), ("oft_blocks", "oft")):
        if name in params:
            return kind
    return None


@torch.no_grad()
def reset(params: dict) -> None:
    """A zero update to start: the scales, diffs and OFT's generators at zero; GLoRA's a1 and
    b2 at zero, a2 and b1 drawn (so that both products get a gradient)."""
    for name in ("glora_a2", "glora_b1"):
        if name in params:
            nn.init.kaiming_uniform_(params[name], a=math.sqrt(5))


# -- the maths ----------------------------------------------------------------------------------
def rotation(blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """OFT's R [k, n, n] from the generators, the WebUI's Cayley transform and constraint."""
    q = blocks - blocks.transpose(1, 2)
    limit = alpha * blocks.shape[0] * blocks.shape[1]  # alpha * out
    if limit != 0:
        norm = q.flatten().norm()
        q = q * ((norm.clamp(max=limit) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(blocks.shape[1], device=blocks.device, dtype=blocks.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def rotated(weight: torch.Tensor, blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    """W' = each block of output rows turned by R^T."""
    r = rotation(blocks, alpha)
    w = weight.reshape(r.shape[0], r.shape[1], -1)
    return torch.einsum("knm,knx->kmx", r, w).reshape(weight.shape)


def ia3_scale(params: dict, weight: torch.Tensor) -> torch.Tensor:
    """w shaped to broadcast over the weight: [out, 1] or [in]."""
    if "ia3_in" in params:
        return params["ia3_in"]
    return params["ia3_out"].reshape(-1, *(1 for _ in weight.shape[1:]))


def glora_update(params: dict, weight: torch.Tensor) -> torch.Tensor:
    return params["glora_b2"] @ params["glora_b1"] + \
        (weight @ params["glora_a2"]) @ params["glora_a1"]


def update(params: dict, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """What the WebUI adds to `weight` (all in one dtype)."""
    kind = kind_of(params)
    if kind == "ia3":
        return weight * ia3_scale(params, weight)
    if kind == "full":
        return params["diff"]
    if kind == "glora":
        return glora_update(params, weight)
    return rotated(weight, params["oft_blocks"], alpha) - weight


def bias_update(params: dict) -> torch.Tensor | None:
    return params.get("diff_b")


def forward(layer, x: torch.Tensor, dtype, weight: torch.Tensor, p: dict) -> torch.Tensor:
    """The layer's output with its base's fp32 weight `weight`, in the compute dtype: the base's
    function with W', b' (`p`: the layer's parameters). (IA)3 too scales the weight, not the
    activations: a weight-sized copy is kept for backward instead of an activation-sized one,
    smaller at SD's sizes."""
    base, kind = layer.base_layer, layer.kind
    bias = None if base.bias is None else base.bias.to(dtype)
    if kind == "ia3":  # in the compute dtype: backward keeps W's copy in it, not in fp32
        w = weight.to(dtype) * (1 + ia3_scale(p, weight)).to(dtype)
        return layer._run(x.to(dtype), w, bias)
    if kind == "full":
        w = weight + p["diff"]
        bias = bias if "diff_b" not in p else layer.effective_bias().to(dtype)
        return layer._run(x.to(dtype), w.to(dtype), bias)
    if kind == "glora":
        return base(x) + F.linear(x.to(dtype), glora_update(p, weight).to(dtype))
    return layer._run(x.to(dtype), rotated(weight, p["oft_blocks"], layer.alpha).to(dtype), bias)


def on_input(params: dict) -> bool | None:
    """The file's `on_input` of an (IA)3 layer (None: not one)."""
    return True if "ia3_in" in params else False if "ia3_out" in params else None
