"""The LyCORIS networks on Flux.1 and SD3.5 (training/flux_lora.py, networks.py): DoRA, LoHa
(with and without dora_wd) and Full, trained per diffusers layer and saved stacked into the one
weight BFL's / SAI's files hold for q, k, v (and a Flux single block's MLP input). Checked
against Forge's loader (dfdcbab6: backend/patcher/lora.py merge_lora_to_weight and
weight_decompose, packages_3rdparty/comfyui_lora_collection/lora.py load_lora), re-implemented
here: every key of the file is read and mapped onto a weight of its shape at full size, and
what Forge makes of the stacked tensors is the trained layers' weights, concatenated. The
networks that do not stack (or that Forge does not apply) are refused in a sentence each."""
from types import SimpleNamespace

import pytest
from flow_helpers import FLUX_FULL, MEDIUM, estimate_is_the_count, flow_lora_config
import torch

from dreambooth.model import flux_keys, sd35_keys
from dreambooth.training import flow_networks, flux_lora
from dreambooth.training.networks import inject_network
from test_networks import forge_weight  # Forge's merge_lora_to_weight, re-implemented

NETWORKS = {"dora": {}, "loha": {}, "loha_wd": {"network": "loha", "dora_wd": True},
            "full": {}}


def net_cfg(name: str, model_type: str, targets: str = "transformer") -> SimpleNamespace:
    settings = dict(network=name, model_type=model_type, lora_targets=targets, lora_rank=2,
                    lora_alpha=3.0, lora_conv_rank=2, lora_conv_alpha=1.0, loha_rank=2,
                    loha_alpha=5.0, dora_wd=False)
    return SimpleNamespace(**{**settings, **NETWORKS[name]})


# -- Forge's loader, re-implemented (strength 1, fp32) --------------------------------------------
# the keys load_lora reads of a module x, per patch it makes
READS = {"lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
         "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
         "diff": ("diff", "diff_b")}


def forge_load(keys, key_map: dict) -> tuple[dict, set]:
    """load_lora's reading of a file's `keys`: ({weight key: {leaf: file key}}, the keys left
    unread), alpha and dora_scale read for any module it maps."""
    patches, read = {}, set()
    for x, target in key_map.items():
        leaves = {leaf: f"{x}.{leaf}" for kind in READS for leaf in READS[kind] + ("alpha",
                  "dora_scale") if f"{x}.{leaf}" in keys}
        if leaves:
            patches[target] = leaves
            read |= set(leaves.values())
    return patches, set(keys) - read


def forge_key_map(host_keys) -> dict:
    """model_lora_keys_unet on Forge's Flux / SD3 model, whose module names are BFL's / SAI's:
    'lora_unet_' + a weight's module path with '_' for '.'."""
    return {"lora_unet_" + k[:-len(".weight")].replace(".", "_"): k for k in host_keys
            if k.endswith(".weight")}


def to_host(config: dict, state: dict) -> dict:
    """A plain diffusers transformer state in the layout Forge's model has (BFL's / SAI's)."""
    if "num_single_layers" in config:
        return flux_keys.to_bfl(state, config["num_layers"], config["num_single_layers"],
                                config["guidance_embeds"])
    return sd35_keys.to_sai(state, config["num_layers"],
                            tuple(config.get("dual_attention_layers") or ()))


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.once
@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_every_key_is_read_and_mapped_by_forge_at_full_size(family):
    """A full-size FLUX.1-dev and SD3.5 medium (meta device), every module 'transformer'
    adapts: the file's layout for DoRA, LoHa (also with dora_wd) and Full is wholly read by
    Forge's load_lora under its key map, each stem onto a weight (and bias) of its shapes,
    DoRA's magnitude on the output axis."""
    config = FLUX_FULL if family == "flux" else MEDIUM
    model_type = "flux-dev" if family == "flux" else "sd3.5-medium"
    meta = flux_lora.meta_transformer(config)
    host = {k: tuple(v.shape) for k, v in to_host(dict(meta.config), meta.state_dict()).items()}
    comp = SimpleNamespace(configs={"unet": dict(meta.config)})
    for name in NETWORKS:
        layout = flow_networks.expected_layout(comp, net_cfg(name, model_type))
        patches, left = forge_load(layout, forge_key_map(host))
        assert not left, (name, sorted(left)[:3])
        assert len(patches) == len({k.split(".")[0] for k in layout}) > 100
        for target, t in patches.items():
            rows, cols = host[target]
            s = {leaf: layout[key] for leaf, key in t.items()}
            if "diff" in s:
                assert s["diff"] == (rows, cols)
                assert s.get("diff_b", (rows,)) == host[target[:-len("weight")] + "bias"]
                continue
            a, b = ("lora_up.weight", "lora_down.weight") if "lora_up.weight" in s else \
                ("hada_w1_a", "hada_w1_b")
            assert (s[a][0], s[b][1]) == (rows, cols) and s["alpha"] == ()
            assert s.get("dora_scale", (rows, 1)) == (rows, 1)


def tiny_transformer(family: str):
    from dreambooth.model import tiny_flux, tiny_sd35
    torch.manual_seed(0)
    return tiny_flux._transformer(True) if family == "flux" else \
        tiny_sd35._transformer("sd3.5-medium")


def plain_states(model) -> tuple[dict, dict]:
    """(the frozen weights, the trained ones) of a transformer with network layers, in the
    plain module's keys: each layer's base weight and bias, and what the layer makes of them."""
    base, trained = {}, {}
    layers = {p: m for p, m in model.named_modules() if hasattr(m, "effective_weight")}
    for key, value in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if path.endswith(".base_layer"):
            layer = layers[path[:-len(".base_layer")]]
            plain = f"{path[:-len('.base_layer')]}.{leaf}"
            base[plain] = value
            trained[plain] = layer.effective_weight() if leaf == "weight" else \
                layer.effective_bias()
        elif path not in layers:
            base[key] = trained[key] = value
    return base, {k: v.detach().float() for k, v in trained.items()}


def assert_forge_makes(config: dict, file: dict, base: dict, trained: dict) -> int:
    """Forge's load_lora + merge_lora_to_weight of `file` on the host layout of `base` gives
    the host layout of `trained`, weight and bias, and reads every key; how many stems."""
    host, want = to_host(config, base), to_host(config, trained)
    patches, left = forge_load(file, forge_key_map(host))
    assert not left, sorted(left)[:3]
    for target, t in patches.items():
        tensors = {leaf: file[key].float() for leaf, key in t.items()}
        torch.testing.assert_close(forge_weight(tensors, host[target].float()),
                                   want[target].float(), rtol=1e-5, atol=1e-5)
        if "diff_b" in tensors:
            bias = target[:-len("weight")] + "bias"
            torch.testing.assert_close(host[bias] + tensors["diff_b"], want[bias])
    changed = {k for k in want if not torch.equal(want[k].float(), host[k].float())}
    assert changed <= set(patches) | {k[:-len("weight")] + "bias" for k in patches}
    return len(patches)


@pytest.mark.once
@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_forge_makes_the_trained_weights_from_the_stacked_tensors(family):
    """Each network on a tiny Flux (a double and a single block) and SD3.5 medium (a dual
    attention block and the last), every tensor drawn at random (no zero update anywhere):
    the file's tensors, stacked, applied by Forge's formulas (re-implemented above) to the
    host's stacked weights are the layers' trained weights, concatenated, and their biases
    (Full), exactly but for rounding; no other weight changes."""
    model_type = "flux-dev" if family == "flux" else "sd3.5-medium"
    for name in NETWORKS:
        model = tiny_transformer(family)
        cfg = net_cfg(name, model_type)
        params = inject_network(model, flux_lora.target_paths(model, "transformer"), cfg)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 or p.shape[0] > 1 else 1))
        comp = SimpleNamespace(configs={"unet": dict(model.config)})
        file = flow_networks.file_state(comp, cfg, model.state_dict())
        assert {k: tuple(v.shape) for k, v in file.items()} == \
            flow_networks.expected_layout(comp, cfg)
        base, trained = plain_states(model)
        stems = assert_forge_makes(dict(model.config), file, base, trained)
        assert stems == (10 if family == "flux" else 15), (name, stems)


def trained_states(model) -> tuple[dict, dict]:
    """plain_states with each adapted layer's base weight as it computes with it (fp8_base:
    upcast with its scale)."""
    from dreambooth.training.networks import base_weight
    base, trained = plain_states(model)
    for path, m in model.named_modules():
        if hasattr(m, "effective_weight"):
            base[f"{path}.weight"] = base_weight(m.base_layer)
    return base, trained


@pytest.mark.parametrize("family, network", [("flux", "dora"), ("sd35", "loha_wd")])
def test_a_tiny_flow_model_trains_a_network_end_to_end(family, network, instance_dir, tmp_path,
                                                        tmp_path_factory):
    """A tiny FLUX.1-dev DoRA on an fp8 base, a tiny SD3.5 medium LoHa with dora_wd: one step
    of four images, the file written in lora_dir with exactly its layout and LyCORIS's
    metadata (the magnitude on the output axis), read back and applied as Forge does: the
    weights the run trained."""
    from safetensors.torch import load_file
    from dreambooth.config import events as ev
    from dreambooth.model.filecheck import read_layout
    from dreambooth.model.tiny_flux import make_tiny_flux
    from dreambooth.model.tiny_sd35 import make_tiny_sd35
    from dreambooth.training.trainer import Trainer
    model_type = "flux-dev" if family == "flux" else "sd3.5-medium"
    make = make_tiny_flux if family == "flux" else make_tiny_sd35
    files = make(tmp_path_factory.mktemp("tiny_" + family), model_type)
    cfg = flow_lora_config(model_type, files, instance_dir, tmp_path, batch_size=4,
                           lora_targets="transformer", fp8_base=family == "flux",
                           loha_rank=2, network=network.split("_")[0],
                           dora_wd=network.endswith("_wd"))
    assert cfg.validate() == []
    trainer = Trainer(cfg.check(), ev.EventBus(lambda e: None), ev.CancelToken())
    result = trainer.run()
    assert result.steps == 1 and all(torch.isfinite(torch.tensor(result.losses)))
    shapes, _, meta = read_layout(result.path)
    assert shapes == flow_networks.expected_layout(trainer.comp, cfg)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert '"wd_on_output": "True"' in meta["ss_network_args"]
    file, unet = load_file(str(result.path)), trainer.comp.unet
    from dreambooth.training import fp8
    stored = [m for p, m in unet.named_modules() if fp8.storable(p, m)]
    assert len(stored) > 10 and all(fp8.is_stored(m) for m in stored) == (family == "flux")
    base, trained = trained_states(unet)
    assert sum(not torch.equal(trained[k], base[k].float()) for k in base) > 10  # it learnt
    assert assert_forge_makes(dict(unet.config), file, base, trained) == \
        (10 if family == "flux" else 15)


@pytest.mark.once
def test_networks_that_do_not_stack_or_load_are_refused_saying_why(tmp_path):
    """Flux and SD3.5 train lora, dora, loha and full; LoCon, LoKr, GLoRA, (IA)3 and OFT are
    refused on `network` before anything loads, each with its reason and a network to choose
    (the model's own stacked weights named)."""
    from dreambooth.config.flux import FLOW_NETWORKS, FLOW_REFUSED
    from dreambooth.config.network import NETWORKS as ALL
    assert set(FLOW_NETWORKS) | set(FLOW_REFUSED) == set(ALL)
    for model_type, model, stacks in (("flux-dev", "Flux", "linear1"),
                                      ("sd3.5-large", "SD3.5", "attn.qkv")):
        why = {"locon": f"{model}'s transformer has none",
               "lokr": "not one Kronecker product of the stacked weight Forge applies the "
                       "file to (", "glora": "would share", "ia3": "Forge: its loader",
               "oft": "Forge: its loader"}
        for network in ALL:
            cfg = flow_lora_config(model_type, {}, tmp_path, tmp_path, network=network,
                                   lora_targets="transformer")
            problems = [p for p in cfg.validate(check_paths=False) if p.field == "network"]
            if network in FLOW_NETWORKS:
                assert problems == [], (model_type, network)
                continue
            (problem,) = problems
            assert why[network] in problem.why and problem.fix.startswith("choose network")
            assert (stacks in problem.why) == (network in ("lokr", "glora")), problem.why
    merged = {n: [p.field for p in flow_lora_config("flux-dev", {}, tmp_path, tmp_path,
                                                     network=n, lora_merge=True
                                                     ).validate(check_paths=False)]
              for n in FLOW_NETWORKS}  # flux_merge.py folds in a plain LoRA only
    assert merged == {n: [] if n == "lora" else ["lora_merge"] for n in FLOW_NETWORKS}, merged


@pytest.mark.once
def test_a_flux_dora_estimate_is_the_step_profile_count(tmp_path):
    """A 2+2 blocks deep FLUX.1-dev DoRA r16 at 1024 px under 'lowest': the estimate of its
    training step (its own layers counted, their weight-sized copies among what a step keeps)
    within 10% of the peak the profile's step holds (measured: 0.1%; LoHa -3%, Full +2%)."""
    import dataclasses
    from bench.profile import flux_cases
    from dreambooth.model.flux import full_size_configs
    case = {c.name: c for c in flux_cases()}["flux_dev_lora_r16_lowest_1024"]
    case = dataclasses.replace(case, name="flux_dev_dora_r16_lowest_1024",
                               settings={**case.settings, "network": "dora"})
    estimate_is_the_count(case, full_size_configs("flux-dev", (2, 2)), (2, 2), tmp_path)
