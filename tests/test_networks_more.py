"""(IA)3, Full, GLoRA, OFT and dora_wd on LoHa / LoKr: trained through the real trainer on the tiny
model, saved, and rebuilt from the saved file by the formulas of the hosts' own loaders,
re-implemented here from their code: AUTOMATIC1111 1.10.1, extensions-builtin/Lora
(network_ia3.py, network_full.py, network_glora.py, network_oft.py; network.py finalize_updown
and networks.py network_apply_weights for the bias) and Forge (backend/patcher/lora.py
merge_lora_to_weight: its 'diff' and 'glora' patches; it loads no (IA)3 and no OFT)."""
import json

import pytest
import torch
from torch import nn

from dreambooth import TrainingConfig
from dreambooth.config.errors import ConfigError
from dreambooth.model.checkpoint import read_checkpoint
from dreambooth.model.single_file import load_single_file
from dreambooth.training import adapters, networks
from test_networks import (MODULE_COUNT, MODULES, by_module, forge_weight, run, trained_layers,
                           webui_updown)

NEW = ("ia3", "full", "glora", "oft")


# -- the hosts' formulas (multiplier / strength 1) ----------------------------------------------
def webui_finalize(w: dict, updown, orig, output_shape, dim=None):
    """network.NetworkModule.finalize_updown: reshape, scale (alpha / dim, `scale`, else 1),
    then apply_weight_decompose where the file has a dora_scale."""
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if orig.numel() == updown.numel():
        updown = updown.reshape(orig.shape)
    alpha = w["alpha"].item() if "alpha" in w else None
    scale = w["scale"].item() if "scale" in w else \
        alpha / dim if dim is not None and alpha is not None else 1.0
    updown = updown * scale
    if "dora_scale" in w:
        merged = updown + orig
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True) \
            .reshape(merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1)
        updown = merged * (w["dora_scale"] / norm) - orig
    return updown


def webui_oft(w: dict, orig):
    """network_oft.NetworkModuleOFT with `oft_blocks` (kohya's / LyCORIS's diag-oft layout):
    alpha is the constraint, num_blocks the first dimension, scale 1."""
    blocks, alpha = w["oft_blocks"], w.get("alpha")
    num, size = blocks.shape[0], orig.shape[0] // blocks.shape[0]
    constraint = (0 if alpha is None else alpha) * orig.shape[0]
    eye = torch.eye(size)
    q = blocks - blocks.transpose(-1, -2)
    if constraint != 0:
        norm = torch.norm(q.flatten())
        q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    r = torch.matmul(eye + q, (eye - q).float().inverse())
    grouped = orig.reshape(num, size, *orig.shape[1:])  # '(k n) ... -> k n ...'
    merged = torch.stack([torch.tensordot(r[k], grouped[k], dims=([0], [0]))
                          for k in range(num)]).reshape(orig.shape)  # 'k n m, k n ... -> k m'
    return merged - orig


def webui_new(w: dict, orig: torch.Tensor):
    """(what 1.10.1 adds to the weight, what it adds to the bias) for one module's tensors."""
    if "on_input" in w:  # network_ia3
        scale = w["weight"]
        shape = [scale.size(0), orig.size(1)]
        if w["on_input"].item():
            shape.reverse()
        else:
            scale = scale.reshape(-1, 1)
        return webui_finalize({}, orig * scale, orig, shape), None
    if "diff" in w:  # network_full: ex_bias is diff_b times the multiplier only
        return webui_finalize(w, w["diff"], orig, w["diff"].shape), w.get("diff_b")
    if "a1.weight" in w:  # network_glora: no dim, so alpha is never read
        a1, a2, b1, b2 = (w[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
        return webui_finalize(w, b2 @ b1 + (orig @ a2) @ a1, orig, [a1.size(0), b1.size(1)]), \
            None
    return webui_finalize(w, webui_oft(w, orig), orig, orig.shape), None  # its self.scale: 1


def forge_new(w: dict, weight: torch.Tensor):
    """Forge's new weight for a 'diff' (full) or 'glora' patch; its GLoRA takes the layout as
    'old' LyCORIS GLoRA when a1, a2, b1, b2 share the rank as their inner dimension."""
    if "diff" in w:
        return weight + w["diff"], w.get("diff_b")
    a1, a2, b1, b2 = (w[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    if b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]:
        old = old and a2.shape[0] == weight.shape[0] and weight.shape[0] == weight.shape[1]
    assert old  # the other branch (a1 @ ... on the right) would be another formula
    alpha = w["alpha"].item() / a1.shape[0]
    return weight + alpha * (b2 @ b1 + (weight.flatten(1) @ a2) @ a1).reshape(weight.shape), None


def assert_hosts_rebuild(layer, w: dict, base: torch.Tensor):
    ours = layer.effective_weight().detach()
    tol = 1e-5 * max(1.0, ours.abs().max().item())
    delta, ex_bias = webui_new(w, base)
    assert torch.allclose(base + delta, ours, atol=tol, rtol=0)
    bias = layer.effective_bias()
    if ex_bias is not None:
        assert torch.allclose(layer.base_layer.bias + ex_bias, bias.detach(), atol=1e-6)
    if "diff" in w or "a1.weight" in w:  # the two of these Forge loads
        weight, forge_bias = forge_new(w, base)
        assert torch.allclose(weight, ours, atol=tol, rtol=0)
        assert (forge_bias is None) == (ex_bias is None)


# -- single modules: each type x Linear, 1x1 conv, 3x3 conv ---------------------------------------
SETTINGS = {"ia3": {}, "full": {}, "glora": {"glora_rank": 3}, "oft": {"oft_block_size": 8},
            "oft_constraint": {"oft_block_size": 5, "oft_constraint": 0.01}}


def saved_tensors(layer, cfg, path: str = "m") -> dict:
    """The file's tensors of one layer (without the stem), as network_state writes them."""
    state = {f"{path}.{k}": v.detach() for k, v in layer.state_dict().items()}
    params = networks.network_params(state)[path]
    w = {networks.PARAMS[k]: v for k, v in params.items()}
    extra = adapters.extra_keys(cfg, path, params, "")
    return {**w, **{k[1:]: v for k, v in extra.items()}}


@pytest.mark.once
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_hosts_rebuild_a_single_trained_module(setting, kind):
    """Every parameter away from its start: the WebUI's formula (and Forge's where it loads the
    type) gives the weight and bias the layer computes with, its forward is theirs, and the
    merge is the WebUI's. (IA)3 and GLoRA adapt no conv (the WebUI's formula can't take one)."""
    torch.manual_seed(0)
    cfg = TrainingConfig(use_lora=True, network=setting.split("_")[0], **SETTINGS[setting])
    base = MODULES[kind]()
    shapes = networks.param_shapes(cfg, "m", tuple(base.weight.shape), True)
    if cfg.network in ("ia3", "glora") and kind != "linear":
        assert shapes == {}
        return
    layer = networks.NetworkLayer(base, shapes, networks.rank_alpha(cfg, "m")[1])
    with torch.no_grad():
        for p in layer.params().values():
            p.add_(torch.randn_like(p) * 0.3)
    w = saved_tensors(layer, cfg)
    assert_hosts_rebuild(layer, w, base.weight.detach())
    x = torch.randn(2, 48) if kind == "linear" else torch.randn(2, 48, 6, 6)
    plain = MODULES[kind]()
    plain.load_state_dict({"weight": layer.effective_weight().detach(),
                           "bias": layer.effective_bias().detach()})
    assert torch.allclose(layer(x), plain(x), atol=1e-5)
    merged = adapters.merged_network_state(
        {f"m.{k}": v for k, v in layer.state_dict().items() if not k.startswith("base_layer")},
        cfg, {"m.weight": base.weight.detach(), "m.bias": base.bias.detach()})
    assert torch.allclose(merged["m.weight"], plain.weight, atol=1e-5)
    assert torch.allclose(merged["m.bias"], plain.bias, atol=1e-6)


@pytest.mark.once
def test_ia3_scales_the_feed_forward_input_and_other_outputs():
    cfg = TrainingConfig(use_lora=True, network="ia3")
    assert networks.param_shapes(cfg, "a.ff.net.2", (320, 1280)) == {"ia3_in": (1280,)}
    assert networks.param_shapes(cfg, "a.mlp.fc2", (32, 37)) == {"ia3_in": (37,)}
    assert networks.param_shapes(cfg, "a.attn1.to_k", (320, 768)) == {"ia3_out": (320,)}
    oft = TrainingConfig(use_lora=True, network="oft", oft_block_size=32)
    assert networks.param_shapes(oft, "x", (1280, 320)) == {"oft_blocks": (40, 32, 32)}
    assert networks.param_shapes(oft, "x", (40, 8)) == {"oft_blocks": (2, 20, 20)}


@pytest.mark.once
@pytest.mark.parametrize("network", ["loha", "lokr"])
def test_dora_wd_on_loha_and_lokr_is_what_both_hosts_apply(network):
    """dora_wd: a dora_scale [1, in] on a LoHa / LoKr layer, applied after the type's own
    scale, as 1.10.1's network.py does for any module and Forge's weight_decompose does."""
    torch.manual_seed(0)
    cfg = TrainingConfig(use_lora=True, network=network, dora_wd=True, lokr_factor=4,
                         loha_rank=3, loha_alpha=2.0)
    for base in (nn.Linear(48, 40), nn.Conv2d(48, 40, 3)):
        shapes = networks.param_shapes(cfg, "m", tuple(base.weight.shape))
        assert shapes["dora_scale"] == (1, 48) + (1, 1) * (base.weight.dim() == 4)
        layer = networks.NetworkLayer(base, shapes, networks.rank_alpha(cfg, "m")[1])
        assert torch.allclose(layer.effective_weight(), base.weight, atol=1e-6)
        with torch.no_grad():
            for p in layer.params().values():
                p.add_(torch.randn_like(p) * 0.3)
        w = saved_tensors(layer, cfg)
        ours, orig = layer.effective_weight().detach(), base.weight.detach()
        assert torch.allclose(orig + webui_updown(w, orig), ours, atol=1e-5)
        assert torch.allclose(forge_weight(w, orig), ours, atol=1e-5)
    meta = adapters.network_metadata(cfg)
    assert json.loads(meta["ss_network_args"])["dora_wd"] == "True"


@pytest.mark.once
def test_settings_a_type_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="dora_wd"):
        TrainingConfig(use_lora=True, network="lora", dora_wd=True).check()
    with pytest.raises(ConfigError, match="lora_targets.*linear layers only"):
        TrainingConfig(use_lora=True, network="glora", lora_targets="transformer+conv").check()


# -- the trained tiny model ------------------------------------------------------------------------
KEYS = {"ia3": 2, "glora": 5, "oft": 2}  # per module: factors, .alpha / .on_input
LINEAR_COUNT = MODULE_COUNT - 16 * 2  # the tiny v1x's proj_in / proj_out are 1x1 convs


def plain_weights(source) -> dict:
    base = load_single_file(str(source), "v1x")
    out = {"lora_unet_" + n.replace(".", "_"): m for n, m in base.unet.named_modules()
           if isinstance(m, (nn.Linear, nn.Conv2d))}
    lead = "" if any(n.startswith("text_model.") for n, _ in
                     base.text_encoder.named_modules()) else "text_model_"
    out.update({"lora_te_" + lead + n.replace(".", "_"): m
                for n, m in base.text_encoder.named_modules() if isinstance(m, nn.Linear)})
    return out


@pytest.mark.parametrize("network", NEW)
def test_each_new_network_trains_saves_merges_with_pivotal(network, tiny_checkpoints,
                                                           instance_dir, tmp_path):
    """One step of each type with its text-encoder layers and a pivotal embedding: exactly the
    expected keys, every module rebuilt by the hosts' formulas as trained, metadata naming the
    algorithm, and the merged checkpoint the source plus the WebUI's delta (weight and bias)."""
    source = tiny_checkpoints("v1x")
    trainer = run(source, instance_dir, tmp_path, network, glora_rank=2, oft_block_size=4)
    tensors, meta = read_checkpoint(trainer.result.path)
    files = by_module(tensors)
    if network == "full":  # diff, and diff_b where the module has a bias
        assert len(files) == MODULE_COUNT and all(set(w) <= {"diff", "diff_b"}
                                                  for w in files.values())
    else:
        assert len(tensors) == KEYS[network] * (MODULE_COUNT if network == "oft"
                                                else LINEAR_COUNT)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == \
        adapters.expected_network_layout(trainer.comp, trainer.cfg)
    assert json.loads(meta["ss_network_args"])["algo"] == \
        {"oft": "diag-oft"}.get(network, network)
    layers, plain = trained_layers(trainer.comp), plain_weights(source)
    assert set(layers) == set(files)
    moved = 0
    for stem, w in files.items():
        if "on_input" in w:
            w["on_input"] = tensors[f"{stem}.on_input"]  # by_module made it a float
        assert_hosts_rebuild(layers[stem], w, plain[stem].weight.detach())
        moved += bool(webui_new(w, plain[stem].weight.detach())[0].abs().max() > 0)
    assert moved > len(files) // 2
    merged, _ = read_checkpoint(tmp_path / "out" / "net_1_merged.safetensors")
    key, stem = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.2", \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
    weight, bias = plain[stem].weight.detach(), plain[stem].bias.detach()
    delta, ex_bias = webui_new(files[stem], weight)
    assert torch.allclose(merged[key + ".weight"], weight + delta, atol=1e-5)
    assert torch.allclose(merged[key + ".bias"], bias + (0 if ex_bias is None else ex_bias),
                          atol=1e-6)


# -- train_norm: the UNet transformers' norms, beside any network ---------------------------------
@pytest.mark.once
def test_norm_layer_is_the_norm_with_the_file_added():
    """network_norm.py (and Forge's 'diff' patches): weight + w_norm, bias + b_norm; the layer's
    forward is the plain norm's with them, for LayerNorm and GroupNorm."""
    from dreambooth.training.network_norm import NormLayer
    torch.manual_seed(0)
    for base, x in ((nn.LayerNorm(12), torch.randn(2, 5, 12)),
                    (nn.GroupNorm(4, 12), torch.randn(2, 12, 3, 3))):
        layer = NormLayer(base)
        assert torch.equal(layer(x), base(x))
        with torch.no_grad():
            layer.w_norm.normal_()
            layer.b_norm.normal_()
        plain = type(base)(*((4, 12) if isinstance(base, nn.GroupNorm) else (12,)))
        plain.load_state_dict({"weight": base.weight + layer.w_norm.detach(),
                               "bias": base.bias + layer.b_norm.detach()})
        assert torch.allclose(layer(x), plain(x), atol=1e-6)


def test_train_norm_with_lora_saves_and_merges_the_norms(tiny_checkpoints, instance_dir,
                                                          tmp_path):
    """peft's LoRA with train_norm: the file adds w_norm / b_norm for each norm of the UNet's
    transformers (exactly the expected keys), the metadata says train_norm, and the merged
    checkpoint's norms are the source's plus the file's."""
    from dreambooth.training.network_norm import NormLayer
    source = tiny_checkpoints("v1x")
    trainer = run(source, instance_dir, tmp_path, "lora", train_norm=True, pivotal=False,
                  lora_text_encoder=False)
    tensors, meta = read_checkpoint(trainer.result.path)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == \
        adapters.file_tensors(trainer.comp, trainer.cfg, {"unet": {}})[1]
    norms = {k: v for k, v in tensors.items() if k.endswith(("w_norm", "b_norm"))}
    assert len(norms) == 2 * (16 * 3 + 16)  # norm1-3 per block, the GroupNorm per Transformer2D
    assert len(tensors) - len(norms) == 3 * (16 * 2 * 4 + 16 * 4)
    assert json.loads(meta["ss_network_args"])["train_norm"] == "True"
    layers = {n: m for n, m in trainer.comp.unet.named_modules() if isinstance(m, NormLayer)}
    path = "down_blocks.0.attentions.0.transformer_blocks.0.norm1"
    stem = "lora_unet_" + path.replace(".", "_")
    assert torch.equal(tensors[f"{stem}.w_norm"], layers[path].w_norm.detach())
    assert tensors[f"{stem}.b_norm"].abs().max() > 0  # the step moved it
    merged, _ = read_checkpoint(tmp_path / "out" / "net_1_merged.safetensors")
    plain = load_single_file(str(source), "v1x").unet.state_dict()
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1"
    assert torch.allclose(merged[key + ".weight"], plain[path + ".weight"]
                          + tensors[f"{stem}.w_norm"], atol=1e-6)
    assert torch.allclose(merged[key + ".bias"], plain[path + ".bias"]
                          + tensors[f"{stem}.b_norm"], atol=1e-6)


@pytest.mark.once
@pytest.mark.parametrize("model_type", ["v1x", "sdxl"])
def test_full_size_norm_keys_land_on_modules_of_the_file(model_type):
    """At full size, every train_norm stem names a norm of the committed single-file layout by
    the WebUI's own mapping rules (the new types' other stems are the modules test_networks
    checks: the same targets, ia3 and glora their linear ones)."""
    from dreambooth.model.components import build_meta
    from dreambooth.training.network_norm import expected_norms
    from test_lora import layout_modules, webui_module
    comp = build_meta(model_type)
    modules = layout_modules(model_type)
    stems = {k.split(".")[0] for k in expected_norms(comp)}
    assert len(stems) == {"v1x": 16 * 4, "sdxl": 70 * 3 + 11}[model_type]
    missed = [s for s in stems if webui_module(s, False) not in modules]
    assert not missed, missed[:5]


@pytest.mark.once
def test_full_leaves_text_encoder_qkv_biases_alone():
    """The WebUI folds a text encoder's q/k/v into OpenCLIP's fused in_proj (SD 2.x, SDXL's
    second encoder) and drops their ex_bias there: no diff_b for them, one for out_proj."""
    cfg = TrainingConfig(use_lora=True, network="full")
    assert networks.param_shapes(cfg, "text_model.encoder.layers.0.self_attn.q_proj",
                                 (32, 32), True) == {"diff": (32, 32)}
    assert networks.param_shapes(cfg, "text_model.encoder.layers.0.self_attn.out_proj",
                                 (32, 32), True) == {"diff": (32, 32), "diff_b": (32,)}


@pytest.mark.once
def test_a_snapshot_from_before_these_settings_resumes_with_their_defaults_only():
    from dreambooth.training.state import config_differences
    now = TrainingConfig(use_lora=True).to_dict()
    new = ("dora_wd", "glora_rank", "oft_block_size", "oft_constraint", "train_norm")
    old = {k: v for k, v in now.items() if k not in new}
    assert config_differences(old, now) == []
    assert config_differences(old, {**now, "train_norm": True}) == ["train_norm: False -> True"]
