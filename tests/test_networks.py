"""LoHa, LoKr, DoRA (and LoCon by name): trained through the real trainer on the tiny model, saved,
and rebuilt from the saved file by the formulas of the hosts' own loaders, re-implemented here
from their code: AUTOMATIC1111 1.10.1, extensions-builtin/Lora (network.py NetworkModule
.finalize_updown / .apply_weight_decompose, network_lora.py, network_hada.py, network_lokr.py,
lyco_helpers.rebuild_conventional) and Forge (backend/patcher/lora.py merge_lora_to_weight /
weight_decompose). What the host adds to a weight must be what the trained module used."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dreambooth import TrainingConfig
from dreambooth.model.checkpoint import read_checkpoint
from dreambooth.model.single_file import load_single_file
from dreambooth.training import adapters, networks
from dreambooth.training.trainer import Trainer
from test_lora import run_lora

OURS = ("loha", "lokr", "dora")


# -- the hosts' formulas (strength / multiplier 1) ----------------------------------------------
def _conventional(up, down, shape):  # lyco_helpers.rebuild_conventional
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def webui_updown(w: dict, orig: torch.Tensor) -> torch.Tensor:
    """What 1.10.1 adds to `orig` for one module's tensors `w` (file keys without the stem)."""
    dim = None
    if "hada_w1_a" in w:  # network_hada.NetworkModuleHada.calc_updown
        w1a, w1b, w2a, w2b = w["hada_w1_a"], w["hada_w1_b"], w["hada_w2_a"], w["hada_w2_b"]
        dim = w1b.shape[0]
        shape = [w1a.size(0), w1b.size(1)] + (list(w1b.shape[2:]) if w1b.dim() == 4 else [])
        updown = _conventional(w1a, w1b, shape) * _conventional(w2a, w2b, shape)
    elif "lokr_w1" in w or "lokr_w1_a" in w:  # network_lokr.NetworkModuleLokr
        dim = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else None
        dim = w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else dim
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w["lokr_w2"] if "lokr_w2" in w else w["lokr_w2_a"] @ w["lokr_w2_b"]
        shape = list(orig.shape) if orig.dim() == 4 else [w1.size(0) * w2.size(0),
                                                          w1.size(1) * w2.size(1)]
        if w2.dim() == 4:  # make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    else:  # network_lora.NetworkModuleLora (no lora_mid)
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        dim = down.shape[0]
        shape = [up.size(0), down.size(1)] + (list(down.shape[2:]) if down.dim() == 4 else [])
        updown = _conventional(up, down, shape)
    if len(shape) == 4:  # network.NetworkModule.finalize_updown
        updown = updown.reshape(shape)
    if orig.numel() == updown.numel():
        updown = updown.reshape(orig.shape)
    alpha = w["alpha"].item() if "alpha" in w else None
    updown = updown * (alpha / dim if dim is not None and alpha is not None else 1.0)
    if "dora_scale" in w:  # apply_weight_decompose
        merged = updown + orig
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True) \
            .reshape(merged.shape[1], *[1] * (orig.dim() - 1)).transpose(0, 1)
        updown = merged * (w["dora_scale"] / norm) - orig
    return updown


def forge_weight(w: dict, weight: torch.Tensor) -> torch.Tensor:
    """Forge's merge_lora_to_weight for one module (strength 1): the new weight ('diff': Full's
    weight patch, added)."""
    if "diff" in w:
        return weight + w["diff"]
    alpha = w["alpha"].item() if "alpha" in w else None
    if "hada_w1_a" in w:
        diff = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
        scale = alpha / w["hada_w1_b"].shape[0] if alpha is not None else 1.0
    elif "lokr_w1" in w or "lokr_w1_a" in w:
        dim = None
        w1 = w.get("lokr_w1")
        if w1 is None:
            dim, w1 = w["lokr_w1_b"].shape[0], w["lokr_w1_a"] @ w["lokr_w1_b"]
        w2 = w.get("lokr_w2")
        if w2 is None:
            dim, w2 = w["lokr_w2_b"].shape[0], w["lokr_w2_a"] @ w["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        diff = torch.kron(w1, w2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
    else:
        diff = w["lora_up.weight"].flatten(1) @ w["lora_down.weight"].flatten(1)
        scale = alpha / w["lora_down.weight"].shape[0] if alpha is not None else 1.0
    diff = diff.reshape(weight.shape)
    if "dora_scale" not in w:
        return weight + scale * diff
    dora, calc = w["dora_scale"], weight + diff * scale  # weight_decompose
    if dora.shape[0] == calc.shape[0]:  # its test for a per-output-row magnitude
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True) \
            .reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True) \
            .reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    return calc * (dora / (norm + torch.finfo(weight.dtype).eps))


def by_module(tensors: dict) -> dict:
    """stem -> {file key without the stem: tensor}."""
    out: dict = {}
    for key, value in tensors.items():
        stem, _, rest = key.partition(".")
        out.setdefault(stem, {})[rest] = value.float()
    return out


def assert_hosts_rebuild(layer, w: dict, base: torch.Tensor):
    """Both hosts' weights from the file's tensors `w` equal the trained layer's own."""
    ours = layer.effective_weight().detach()
    tol = 1e-5 * max(1.0, ours.abs().max().item())
    assert torch.allclose(base + webui_updown(w, base), ours, atol=tol, rtol=0)
    assert torch.allclose(forge_weight(w, base), ours, atol=tol, rtol=0)


# -- single modules: every type x Linear, 1x1 conv, 3x3 conv --------------------------------------
MODULES = {"linear": lambda: nn.Linear(48, 40), "conv1x1": lambda: nn.Conv2d(48, 40, 1),
           "conv3x3": lambda: nn.Conv2d(48, 40, 3, padding=1)}
SETTINGS = {"loha": {}, "lokr": {"lokr_factor": 4}, "lokr_rank": {"lokr_factor": -1,
                                                                   "lokr_rank": 3},
            "dora": {"lora_rank": 4, "lora_alpha": 3.0}}


@pytest.mark.once
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_hosts_rebuild_a_single_trained_module(setting, kind):
    """A layer with every parameter away from its start (as after training) on each module
    kind, its tensors written as network_state writes them: the WebUI's and Forge's formulas
    give the weight the layer computes with, and its forward is that weight's."""
    torch.manual_seed(0)
    cfg = TrainingConfig(use_lora=True, network=setting.split("_")[0], **SETTINGS[setting])
    base = MODULES[kind]()
    layer = networks.NetworkLayer(base, networks.param_shapes(cfg, "m", tuple(base.weight.shape)),
                                  networks.rank_alpha(cfg, "m")[1])
    with torch.no_grad():
        for p in layer.params().values():
            p.add_(torch.randn_like(p) * 0.3)
    state = {f"m.{k}": v.detach() for k, v in layer.state_dict().items()}
    w = {networks.PARAMS[k]: v for k, v in networks.network_params(state)["m"].items()}
    w["alpha"] = torch.tensor(layer.alpha)
    assert_hosts_rebuild(layer, w, base.weight.detach())
    x = torch.randn(2, 48) if kind == "linear" else torch.randn(2, 48, 6, 6)
    plain = MODULES[kind]()
    plain.load_state_dict({"weight": layer.effective_weight().detach(), "bias": base.bias})
    assert torch.allclose(layer(x), plain(x), atol=1e-5)
    merged = adapters.merged_network_state(state, cfg, {"m.weight": base.weight.detach()})
    assert torch.allclose(merged["m.weight"], base.weight + webui_updown(w, base.weight),
                          atol=1e-5)


def test_dora_magnitude_is_per_input_column():
    """The WebUI's convention, not peft's: a fresh DoRA layer's dora_scale is the norm of each
    input column, shaped [1, in] / [1, in, 1, 1]; it leaves the weight as it was."""
    cfg = TrainingConfig(use_lora=True, network="dora")
    for base in (nn.Linear(6, 5), nn.Conv2d(6, 5, 3)):
        layer = networks.NetworkLayer(base, networks.param_shapes(
            cfg, "m", tuple(base.weight.shape)), 16.0)
        w = base.weight.detach()
        cols = torch.stack([w[:, i].norm() for i in range(6)])
        assert torch.allclose(layer.dora_scale.flatten(), cols)
        assert layer.dora_scale.shape == (1, 6) + (1, 1) * (w.dim() == 4)
        assert torch.allclose(layer.effective_weight(), w, atol=1e-6)


# -- the trained tiny model -------------------------------------------------------------------------
def run(source, instance_dir, tmp_path, network, **changes) -> Trainer:
    """test_lora's run, with the network, pivotal tuning and merge on, a batch of all four."""
    return run_lora(source, "v1x", instance_dir, tmp_path, **{
        "model_name": "net", "embedding_dir": str(tmp_path / "emb"), "batch_size": 4,
        "network": network, "loha_rank": 2, "loha_alpha": 1.0, "lokr_factor": 4,
        "lora_merge": True, "pivotal": True, "embedding_token": "sks",
        "embedding_init_word": "pattern", **changes})


def trained_layers(comp) -> dict:
    """kohya stem -> the trained layer, for the UNet and the text encoder."""
    out = {}
    for component, module in (("unet", comp.unet), ("text_encoder", comp.text_encoder)):
        for path, m in module.named_modules():
            if isinstance(m, networks.NetworkLayer):
                lead = "" if component == "unet" or path.startswith("text_model.") \
                    else "text_model."
                out[adapters.kohya_name(comp, component, lead + path)] = m
    return out


KEYS = {"loha": 5, "lokr": 3, "dora": 4}  # per module: the factors and .alpha
TRAINED_KEYS = {**KEYS, "lokr": 4}  # the trained LoKr with dora_wd: + dora_scale
MODULE_COUNT = 16 * 2 * 4 + 16 * 4 + 2 * 6  # tiny v1x, 'transformer' targets (test_lora COUNTS)


@pytest.mark.parametrize("network", OURS)
def test_each_network_trains_saves_merges_with_pivotal(network, tiny_checkpoints, instance_dir,
                                                       tmp_path):
    """One step of each type (LoKr with dora_wd) with its text-encoder layers and a pivotal
    embedding: the file holds exactly the expected keys, every module (UNet Linear and 1x1
    conv, text-encoder attention and MLP) is rebuilt by both hosts' formulas as trained, and
    the merged checkpoint is the source plus the WebUI's delta."""
    source = tiny_checkpoints("v1x")
    trainer = run(source, instance_dir, tmp_path, network, dora_wd=network == "lokr")
    path = trainer.result.path
    tensors, meta = read_checkpoint(path)
    assert len(tensors) == TRAINED_KEYS[network] * MODULE_COUNT
    assert {k: tuple(v.shape) for k, v in tensors.items()} == \
        adapters.expected_network_layout(trainer.comp, trainer.cfg)
    assert json.loads(meta["ss_network_args"])["algo"] == {"dora": "lora"}.get(network, network)
    assert meta["ss_network_module"] == "lycoris.kohya"
    layers = trained_layers(trainer.comp)
    files = by_module(tensors)
    assert set(layers) == set(files)
    base = load_single_file(str(source), "v1x")
    plain = {"lora_unet_" + n.replace(".", "_"): m.weight.detach()
             for n, m in base.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    lead = "" if any(n.startswith("text_model.") for n, _ in
                     base.text_encoder.named_modules()) else "text_model_"
    plain.update({"lora_te_" + lead + n.replace(".", "_"): m.weight.detach()
                  for n, m in base.text_encoder.named_modules() if isinstance(m, nn.Linear)})
    moved = 0
    for stem, w in files.items():
        assert_hosts_rebuild(layers[stem], w, plain[stem])
        moved += bool(webui_updown(w, plain[stem]).abs().max() > 0)
    assert moved > MODULE_COUNT // 2  # the step reached most modules
    merged, _ = read_checkpoint(tmp_path / "out" / "net_1_merged.safetensors")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert torch.allclose(merged[key], plain[stem] + webui_updown(files[stem], plain[stem]),
                          atol=1e-5)
    emb = [p for p in trainer.saved if "emb" in Path(p).parts[-2]]
    assert emb and Path(emb[0]).exists()


def test_locon_is_lora_with_the_resnet_convolutions(tiny_checkpoints, instance_dir, tmp_path):
    """network 'locon' with the default lora_targets trains the ResNet convs too: kohya's
    layout (lora_down/lora_up/alpha) with lora_conv_rank on them, ss_network_args saying so."""
    trainer = run(tiny_checkpoints("v1x"), instance_dir, tmp_path, "locon", lora_conv_rank=2,
                  lora_merge=False, pivotal=False, lora_text_encoder=False)
    tensors, meta = read_checkpoint(trainer.result.path)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"
    assert tensors[conv].shape == (2, 32, 3, 3)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "8.0"}
    assert len(tensors) == 3 * (16 * 2 * 4 + 16 * 4 + 22 * 2 + 13)


@pytest.mark.once
@pytest.mark.parametrize("model_type", ["v1x", "v2x-512", "sdxl"])
def test_full_size_network_keys_all_land_on_modules_of_the_file(model_type):
    """At full size, every type's keys (with the text encoders) name a module of the committed
    single-file layout by the WebUI's own mapping rules, and their count is kohya's."""
    from dreambooth.model.components import build_meta
    from test_lora import layout_modules, webui_module
    comp = build_meta(model_type)
    modules = layout_modules(model_type)
    for network in OURS:
        cfg = TrainingConfig(use_lora=True, network=network, lora_text_encoder=True)
        layout = adapters.expected_network_layout(comp, cfg)
        stems = {k.split(".")[0] for k in layout}
        assert len(layout) == KEYS[network] * len(stems)
        missed = [s for s in stems if webui_module(s, comp.spec.family == "v2") not in modules]
        assert not missed, missed[:5]


def test_a_file_with_a_value_no_host_can_use_is_refused():
    from dreambooth.config.errors import DreamboothError
    adapters.refuse_unloadable({"a.alpha": torch.tensor(1.0), "a.hada_w1_a": torch.ones(2)},
                               "fp16")
    with pytest.raises(DreamboothError, match="'a.hada_w1_a'.*fp16"):
        adapters.refuse_unloadable({"a.hada_w1_a": torch.tensor([1.0, float("inf")])}, "fp16")
