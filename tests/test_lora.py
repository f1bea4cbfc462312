"""DreamBooth-LoRA: trained through the real trainer on the tiny models, saved as one kohya-layout
file, and applied by an independent implementation of the kohya merge (W += up @ down * alpha /
rank, 1x1 convs squeezed) to the base weights: the model gives what the peft-wrapped one gives."""
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from dreambooth import Concept, TrainingConfig
from dreambooth.config import events as ev
from dreambooth.model.checkpoint import read_checkpoint, write_safetensors
from dreambooth.model.components import encode_prompts
from dreambooth.model.single_file import load_single_file
from dreambooth.training.lora import inject, kohya_state, merged_state
from dreambooth.training.trainer import Trainer


@pytest.fixture(scope="module")
def sources(tiny_checkpoints):
    return {t: tiny_checkpoints(t) for t in ("v1x", "sdxl")}


def run_lora(source, model_type, instance_dir, tmp_path, **changes) -> Trainer:
    settings = dict(
        model_name="lora", source_checkpoint=str(source), model_type=model_type,
        work_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"),
        lora_dir=str(tmp_path / "Lora"), resolution=64, center_crop=True, batch_size=2,
        steps_per_image=1, use_lora=True, lora_rank=4, lora_alpha=8.0, lora_learning_rate=1e-2,
        lora_text_encoder=True, lora_text_encoder_learning_rate=1e-2,
        concepts=(Concept(str(instance_dir), "photo of sks pattern"),))
    cfg = TrainingConfig(**{**settings, **changes}).check()
    events = []
    trainer = Trainer(cfg, ev.EventBus(events.append), ev.CancelToken())
    trainer.result = trainer.run()
    trainer.saved = [e.path for e in events if isinstance(e, ev.CheckpointSaved)]
    return trainer


def kohya_pairs(lora: dict):
    """(stem, down, up, alpha / rank) of every LoRA module in a kohya file."""
    for key in sorted(lora):
        if key.endswith(".lora_down.weight"):
            stem = key[:-len(".lora_down.weight")]
            down, up = lora[key].float(), lora[f"{stem}.lora_up.weight"].float()
            yield stem, down, up, lora[f"{stem}.alpha"].item() / down.shape[0]


def delta(down, up, scale, shape):
    return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale


def merge_by_module_names(comp, lora: dict) -> int:
    """SD 1.x/2.x LoRA names are diffusers / transformers module paths with '_' for '.'."""
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in comp.unet.named_modules()}
    te = comp.text_encoder
    lead = "" if any(n.startswith("text_model.") for n, _ in te.named_modules()) else "text_model_"
    modules.update({"lora_te_" + lead + n.replace(".", "_"): m for n, m in te.named_modules()})
    with torch.no_grad():
        for stem, down, up, scale in kohya_pairs(lora):
            w = modules[stem].weight
            w += delta(down, up, scale, w.shape)
    return len(list(kohya_pairs(lora)))


def merge_into_single_file(state: dict, lora: dict) -> int:
    """SDXL LoRA names are the single file's own: LDM UNet paths, CLIP text paths, and for the
    OpenCLIP encoder q/k/v the rows of the fused in_proj (as the WebUI applies them)."""
    where = {}
    for key in state:
        for prefix, name in (("model.diffusion_model.", "lora_unet_"),
                             ("conditioner.embedders.0.transformer.", "lora_te1_")):
            if key.startswith(prefix) and key.endswith(".weight"):
                where[name + key[len(prefix):-len(".weight")].replace(".", "_")] = (key, None)
    for stem, down, up, scale in kohya_pairs(lora):
        if stem.startswith("lora_te2_"):
            n, proj = stem.split("_layers_")[1].split("_", 1)
            base = f"conditioner.embedders.1.model.transformer.resblocks.{n}."
            part = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2}.get(proj)
            key = base + ("attn.in_proj_weight" if part is not None else {
                "self_attn_out_proj": "attn.out_proj", "mlp_fc1": "mlp.c_fc",
                "mlp_fc2": "mlp.c_proj"}[proj] + ".weight")
            rows = state[key].shape[0] // 3 if part is not None else state[key].shape[0]
            block = slice(part * rows, (part + 1) * rows) if part is not None else slice(None)
        else:
            key, block = where[stem][0], slice(None)
        state[key][block] += delta(down, up, scale, state[key][block].shape)
    return len(list(kohya_pairs(lora)))


@torch.no_grad()
def outputs(comp, family: str) -> list:
    torch.manual_seed(1)
    cond = encode_prompts(comp, ["photo of sks pattern"], "cpu")
    width = comp.configs["unet"]["cross_attention_dim"]
    kwargs = {} if family != "sdxl" else {"added_cond_kwargs": {
        "text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}}
    sample = comp.unet.eval()(torch.randn(1, 4, 8, 8), torch.tensor([500]),
                              torch.randn(1, 77, width), **kwargs).sample
    return [sample, *cond.values()]


COUNTS = {  # LoRA modules (UNet, text encoders) of the tiny models
    ("v1x", "attention"): 16 * 2 * 4 + 2 * 4,  # 16 transformer blocks, 2 TE layers
    ("v1x", "transformer"): 16 * 2 * 4 + 16 * 4 + 2 * 6,  # + ff, proj_in/out; TE + fc1/fc2
    ("v1x", "transformer+conv"): 16 * 2 * 4 + 16 * 4 + 2 * 6 + 22 * 2 + 13,  # 22 resnets, 13
    # of them with a 1x1 conv_shortcut
    ("sdxl", "attention"): 17 * 2 * 4 + 2 * 2 * 4,  # 17 blocks, 2 TEs
    ("sdxl", "transformer"): 17 * 2 * 4 + 17 * 2 + 11 * 2 + 2 * 2 * 6,  # 11 Transformer2Ds
    ("sdxl", "transformer+conv"): 17 * 2 * 4 + 17 * 2 + 11 * 2 + 2 * 2 * 6 + 17 * 2 + 10,
}


@pytest.mark.parametrize("model_type, precision, targets", [
    ("v1x", "no", "attention"), ("sdxl", "no", "attention"), ("v1x", "bf16", "transformer"),
    ("sdxl", "no", "transformer"), ("v1x", "no", "transformer+conv"),
    ("sdxl", "no", "transformer+conv")])
def test_lora_file_merged_independently_gives_the_peft_model(model_type, precision, targets,
                                                              sources, instance_dir, tmp_path):
    """Each target set, trained a few steps, merged by names alone (every key must name a module
    of the base). With bf16 the frozen base trains as a bf16 copy; the merged checkpoint still
    holds the untouched fp32 weights plus the LoRA (and the VAE and text encoder as they were)."""
    trainer = run_lora(sources[model_type], model_type, instance_dir, tmp_path,
                       lora_merge=model_type == "v1x", mixed_precision=precision,
                       lora_targets=targets, lora_conv_rank=2, lora_conv_alpha=1.0)
    if precision == "bf16":
        assert next(trainer.comp.unet.parameters()).dtype == torch.bfloat16
        assert {p.dtype for p in trainer.comp.unet.parameters() if p.requires_grad} \
            == {torch.float32}
    path = trainer.result.path
    assert path.parent == tmp_path / "Lora" and path.name == "lora_2.safetensors"
    lora, meta = read_checkpoint(path)
    prefixes = {"_".join(k.split("_")[:2]) for k in lora}
    assert prefixes == ({"lora_unet", "lora_te"} if model_type == "v1x"
                        else {"lora_unet", "lora_te1", "lora_te2"})
    idle = [k for k, v in lora.items() if "lora_up" in k and not torch.count_nonzero(v)]
    assert targets != "attention" or all(  # 1 token: no q/k grad
        "mid_block_attentions_0_transformer_blocks_0_attn1_to_" in k
        or k.startswith("lora_te1_text_model_encoder_layers_1_")  # SDXL: penultimate only
        for k in idle) and len(idle) <= 4, idle
    if model_type == "v1x":
        base = load_single_file(str(sources["v1x"]), "v1x")
        assert merge_by_module_names(base, lora) == COUNTS[model_type, targets]
        merged_path = tmp_path / "out" / "lora_2_merged.safetensors"  # announced, never the LoRA's
        assert trainer.saved == [str(merged_path), str(path)]
        merged_file, _ = read_checkpoint(merged_path)
        assert all(torch.allclose(merged_file[k], v, atol=1e-6)
                   for k, v in read_checkpoint(_saved(base, tmp_path))[0].items())
    else:
        state, base_meta = read_checkpoint(sources["sdxl"])
        assert merge_into_single_file(state, lora) == COUNTS[model_type, targets]
        base = load_single_file(str(write_safetensors(tmp_path / "m.safetensors", state,
                                                      base_meta)), "sdxl")
    if precision != "no":
        return
    for ours, peft in zip(outputs(base, base.spec.family), outputs(trainer.comp, base.spec.family)):
        assert torch.allclose(ours, peft, atol=1e-4), (ours - peft).abs().max()


def _saved(comp, tmp_path):
    from dreambooth.model.single_file import save_single_file
    return save_single_file(comp, tmp_path / "independent.safetensors")


def test_lora_file_metadata_the_webui_reads(sources, instance_dir, tmp_path):
    trainer = run_lora(sources["v1x"], "v1x", instance_dir, tmp_path, lora_text_encoder=False,
                       save_precision="fp16")
    path = trainer.result.path
    lora, meta = read_checkpoint(path)
    assert all(v.dtype == torch.float16 for v in lora.values())
    assert not any(k.startswith("lora_te") for k in lora)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"],
            meta["ss_v2"], meta["ss_num_train_images"], meta["ss_steps"]) == \
        ("4", "8.0", "sd_v1", "False", "4", "2")
    assert json.loads(meta["ss_tag_frequency"]) == {instance_dir.name: {"photo of sks pattern": 4}}
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    data = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(
        data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["activation text"] == "photo of sks pattern" and card["sd version"] == "SD1"
    assert not (tmp_path / "runs" / "lora" / "working").exists()  # the model itself is unchanged


def test_kohya_layout_and_merge_with_1x1_convs(sources):
    """SD 1.x's transformer proj_in/proj_out are 1x1 convs: the same file layout and merge."""
    comp = load_single_file(str(sources["v1x"]), "v1x")
    plain = load_single_file(str(sources["v1x"]), "v1x")
    inject(comp.unet, 4, 2.0, ("proj_in", "to_q"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in comp.unet.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    lora = kohya_state(comp, 2.0, {"unet": comp.unet.state_dict()})
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
    assert lora[key].shape == (4, 32, 1, 1)
    merge_by_module_names(plain, lora)
    assert torch.allclose(outputs(plain, "v1")[0], outputs(comp, "v1")[0], atol=1e-4)
    merged = merged_state(comp.unet.state_dict(), 2.0 / 4)
    assert all(torch.allclose(merged[k], v, atol=1e-6) for k, v in plain.unet.state_dict().items())



# -- full size: kohya's module counts, and every key onto a module of the file, as the WebUI maps -
RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "conv_shortcut": "skip_connection"}


def _openclip(layer: str, rest: str, prefix: str) -> str:
    rest = rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj")
    rest = re.sub(r"self_attn_[qkv]_proj$", "attn_in_proj", rest).replace("self_attn", "attn")
    return f"{prefix}_transformer_resblocks_{layer}_{rest}"


def layout_modules(model_type: str) -> set[str]:
    """The ('_'-flattened) modules of the committed full-size single-file layout of
    `model_type` that a network key can land on: every weight's, and OpenCLIP's fused in_proj."""
    text = gzip.decompress((Path(__file__).parent / "data" / f"layout_{model_type}.txt.gz")
                           .read_bytes()).decode()
    keys = [line.split("\t")[0] for line in text.splitlines() if not line.startswith("#")]
    modules = {k.rsplit(".", 1)[0].replace(".", "_") for k in keys if k.endswith(".weight")}
    return modules | {k[:-len("_weight")].replace(".", "_") for k in keys
                      if k.endswith(".in_proj_weight")}


def webui_module(stem: str, sd2: bool) -> str:
    """A kohya key stem as the ('_'-flattened) single-file module it lands on, by the rules of the
    WebUI's built-in Lora (convert_diffusers_name_to_compvis, q/k/v onto OpenCLIP's fused
    in_proj; SDXL names are LDM paths already), written from those rules, not our converter."""
    m = re.fullmatch(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", stem)
    if m:
        where, block, kind, n, rest = m.groups()
        index = int(block) * 3 + int(n) + (where == "down")
        rest = RESNET.get(rest, rest) if kind == "resnets" else rest
        blocks = "input_blocks" if where == "down" else "output_blocks"
        return f"model_diffusion_model_{blocks}_{index}_{int(kind == 'attentions')}_{rest}"
    m = re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", stem)
    if m:
        kind, n, rest = m.groups()
        rest = RESNET.get(rest, rest) if kind == "resnets" else rest
        index = 1 if kind == "attentions" else int(n) * 2
        return f"model_diffusion_model_middle_block_{index}_{rest}"
    m = re.fullmatch(r"lora_te(2?)_text_model_encoder_layers_(\d+)_(.+)", stem)
    if m and (m.group(1) or sd2):
        prefix = "conditioner_embedders_1_model" if m.group(1) else "cond_stage_model_model"
        return _openclip(m.group(2), m.group(3), prefix)
    for ours, theirs in (("lora_unet_", "model_diffusion_model_"),
                         ("lora_te1_", "conditioner_embedders_0_transformer_"),
                         ("lora_te_", "cond_stage_model_transformer_")):
        if stem.startswith(ours):
            return theirs + stem[len(ours):]
    return stem


@pytest.mark.parametrize("model_type, unet, te", [("v1x", 192, 72), ("v2x-512", 192, 23 * 6),
                                                  ("sdxl", 722, 12 * 6 + 32 * 6)])
def test_full_size_keys_all_land_on_modules_of_the_file(model_type, unet, te):
    """kohya's default network has 192 UNet modules in SD1/SD2 and 722 in SDXL; LoCon adds the
    ResNet convs. With the text encoders, every key lands on a module of the committed
    full-size layout (0 unmatched)."""
    from dreambooth.model.components import build_meta
    from dreambooth.training.lora import expected_layout
    comp, counts, unmatched = build_meta(model_type), {}, []
    modules = layout_modules(model_type)
    for targets in ("attention", "transformer", "transformer+conv"):
        stems = [k[:-6] for k in expected_layout(comp, 4, True, targets, 2) if k.endswith(".alpha")]
        counts[targets] = sum(s.startswith("lora_unet_") for s in stems), len(stems)
        unmatched += [s for s in stems if webui_module(s, comp.spec.family == "v2") not in modules]
    assert counts["transformer"] == (unet, unet + te)
    assert counts["attention"][0] < unet < counts["transformer+conv"][0]
    assert not unmatched, unmatched[:5]


def test_a_snapshot_from_before_lora_targets_resumes_only_with_its_attention_set():
    from dreambooth.training.state import config_differences
    old = TrainingConfig(use_lora=True).to_dict()
    for key in ("lora_targets", "lora_conv_rank", "lora_conv_alpha"):
        del old[key]
    assert config_differences(old, TrainingConfig(use_lora=True).to_dict()) == \
        ["lora_targets: 'attention' -> 'transformer'"]
    assert config_differences(old, TrainingConfig(use_lora=True,
                                                  lora_targets="attention").to_dict()) == []
