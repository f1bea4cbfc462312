"""OpenCLIP text encoder keys (SD 2.x, SDXL's second encoder) <-> transformers' CLIP text model.

Pure functions over state dicts. OpenCLIP stacks q, k and v into one `attn.in_proj_weight` /
`in_proj_bias` (in that order along dim 0) and applies its projection as `x @ text_projection`;
transformers has separate q/k/v Linear layers and a Linear `text_projection` whose weight is the
transpose. Keys on the transformers side are 'text_model.'-prefixed (see models.te_state).
"""
from __future__ import annotations

import torch

HF_LAYERS = "text_model.encoder.layers."
OC_LAYERS = "transformer.resblocks."
QKV = ("q_proj", "k_proj", "v_proj")
TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
       "text_model.embeddings.position_embedding.weight": "positional_embedding",
       "text_model.final_layer_norm.weight": "ln_final.weight",
       "text_model.final_layer_norm.bias": "ln_final.bias"}
TOP_BACK = {v: k for k, v in TOP.items()}
IN_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
            ("mlp.fc2.", "mlp.c_proj."), ("self_attn.out_proj.", "attn.out_proj."))
PROJECTION_HF, PROJECTION_OC = "text_projection.weight", "text_projection"


def _swap(rest: str, forward: bool) -> str | None:
    for hf, oc in IN_LAYER:
        src, dst = (hf, oc) if forward else (oc, hf)
        if rest.startswith(src):
            return dst + rest[len(src):]
    return None


def to_openclip(state: dict, deferred: bool = False) -> dict:
    """transformers CLIP text keys -> OpenCLIP keys (q/k/v fused, projection transposed);
    `deferred`: the fused and transposed tensors as streamed.Deferred ones, made when a
    streamed write reaches them."""
    out, fused = {}, {}
    for key, value in state.items():
        if key in TOP:
            out[TOP[key]] = value
        elif key == PROJECTION_HF:
            out[PROJECTION_OC] = _later(lambda v=value: v.T.contiguous(), tuple(
                value.shape[::-1]), value.dtype) if deferred else value.T.contiguous()
        elif key.startswith(HF_LAYERS):
            n, rest = key[len(HF_LAYERS):].split(".", 1)
            parts = rest.split(".")
            if parts[0] == "self_attn" and parts[1] in QKV:
                fused.setdefault((n, parts[2]), {})[parts[1]] = value
                continue
            new = _swap(rest, forward=True)
            if new is None:
                raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
            out[f"{OC_LAYERS}{n}.{new}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
    for (n, kind), parts in fused.items():
        if set(parts) != set(QKV):
            raise KeyError(f"text encoder layer {n} lacks one of q/k/v ({kind})")
        qkv = [parts[p] for p in QKV]
        shape = (sum(p.shape[0] for p in qkv), *qkv[0].shape[1:])
        out[f"{OC_LAYERS}{n}.attn.in_proj_{kind}"] = _later(
            lambda qkv=qkv: torch.cat(qkv), shape, qkv[0].dtype) if deferred else torch.cat(qkv)
    return out


def _later(make, shape: tuple, dtype):
    from .streamed import Deferred
    return Deferred(tuple(shape), dtype, make)


def from_openclip(state: dict, layers: int, projection: bool) -> tuple[dict, dict]:
    """OpenCLIP keys -> (transformers keys of a `layers`-layer model, the rest untouched).

    The rest is what the transformers model has no place for and a single file must keep
    bit-identical: SD 2.x's last layer (it conditions on the penultimate one), `logit_scale`,
    and `text_projection` when the model has no projection."""
    out, rest = {}, {}
    for key, value in state.items():
        if key in TOP_BACK:
            out[TOP_BACK[key]] = value
        elif key == PROJECTION_OC and projection:
            out[PROJECTION_HF] = value.T.contiguous()
        elif key.startswith(OC_LAYERS) and int(key[len(OC_LAYERS):].split(".")[0]) < layers:
            n, tail = key[len(OC_LAYERS):].split(".", 1)
            out.update(_layer_from_openclip(f"{HF_LAYERS}{n}.", tail, value, key))
        else:
            rest[key] = value
    return out, rest


def _layer_from_openclip(prefix: str, tail: str, value, key: str) -> dict:
    if tail.startswith("attn.in_proj_"):
        kind = tail[len("attn.in_proj_"):]
        return {f"{prefix}self_attn.{p}.{kind}": chunk.clone()
                for p, chunk in zip(QKV, torch.chunk(value, 3, dim=0))}
    new = _swap(tail, forward=False)
    if new is None:
        raise KeyError(f"unknown OpenCLIP text encoder key {key!r}")
    return {prefix + new: value}


def layer_shapes(width: int, ff: int, index: int) -> dict:
    """Key -> shape of one OpenCLIP residual block (an independent statement of the layout)."""
    p = f"{OC_LAYERS}{index}."
    return {p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (ff, width), p + "mlp.c_fc.bias": (ff,),
            p + "mlp.c_proj.weight": (width, ff), p + "mlp.c_proj.bias": (width,)}


def extra_shapes(config: dict, extra_layers: int, projection: bool) -> dict:
    """Key -> shape of what an OpenCLIP text tower holds beyond the transformers model of
    `config`: `extra_layers` blocks after its last one, the projection (when the model has none;
    square, as in ViT-H and bigG) and `logit_scale`."""
    width, ff = config["hidden_size"], config["intermediate_size"]
    first = config["num_hidden_layers"]
    shapes = {}
    for n in range(first, first + extra_layers):
        shapes.update(layer_shapes(width, ff, n))
    if not projection:
        shapes[PROJECTION_OC] = (width, width)
    shapes["logit_scale"] = ()
    return shapes


def random_extras(shapes: dict, device=None) -> dict:
    """Tensors of `shapes` initialised as a fresh model would be (tests, tiny models)."""
    out = {}
    for key, shape in shapes.items():
        if key == "logit_scale":
            out[key] = torch.tensor(4.6052, device=device)  # ln(100), the trained CLIP value
        elif key.endswith("bias"):
            out[key] = torch.zeros(shape, device=device)
        elif ".ln_" in key:
            out[key] = torch.ones(shape, device=device)
        else:
            out[key] = torch.randn(shape, device=device) * 0.02
    return out
