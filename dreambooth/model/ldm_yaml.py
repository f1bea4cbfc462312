"""The WebUI's `<name>.yaml` beside a checkpoint: the LDM / SGM config it builds the model from.

The WebUI guesses the config of a checkpoint from its keys, and for SD 2.x decides between
epsilon and v-prediction by running the UNet once; a `<name>.yaml` beside the file overrides the
guess. We write one whenever the guess could be wrong: v-prediction models, and models whose
shapes differ from the standard ones (the tiny test models). A source checkpoint's own yaml is
copied to its outputs as it is.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import write_text

MARKER = ("# Written by the Dreambooth extension: the WebUI builds the checkpoint beside it "
          "from this.\n")
ARCH_FIELDS = {
    "unet": ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
             "transformer_layers_per_block", "down_block_types", "up_block_types", "in_channels",
             "out_channels", "use_linear_projection", "projection_class_embeddings_input_dim",
             "addition_time_embed_dim", "sample_size"),
    "vae": ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"),
    "text_encoder": ("hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads"),
}
ARCH_FIELDS["text_encoder_2"] = ARCH_FIELDS["text_encoder"]
TEXT_ENCODERS = {
    "v1": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"},
    "v2": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
           "params": {"freeze": True, "layer": "penultimate"}},
}


def is_standard(comp) -> bool:
    """True when the model has the shapes of its type's shipped (full-size) configs."""
    from .spec import shipped_configs
    shipped = shipped_configs(comp.model_type)
    return all(comp.configs[name].get(f) == shipped[name].get(f)
               for name in shipped if name in ARCH_FIELDS for f in ARCH_FIELDS[name])


def needs_yaml(comp) -> bool:
    return comp.spec.prediction_type == "v_prediction" or not is_standard(comp)


def _unet_params(u: dict, sdxl: bool) -> dict:
    ch = u["block_out_channels"]
    heads = u["attention_head_dim"]  # diffusers' name for the number of heads per level
    p = {"use_checkpoint": True, "image_size": 32, "in_channels": u["in_channels"],
         "out_channels": u["out_channels"], "model_channels": ch[0],
         "attention_resolutions": [2 ** i for i, t in reversed(list(enumerate(
             u["down_block_types"]))) if "CrossAttn" in t],
         "num_res_blocks": u["layers_per_block"], "channel_mult": [c // ch[0] for c in ch],
         "use_spatial_transformer": True,
         "transformer_depth": u.get("transformer_layers_per_block", 1),
         "context_dim": u["cross_attention_dim"], "legacy": False}
    per_head = {c // h for c, h in zip(ch, heads)} if isinstance(heads, list) else set()
    if len(per_head) == 1:
        p["num_head_channels"] = per_head.pop()
    else:
        p["num_heads"] = heads if isinstance(heads, int) else heads[0]
    if u.get("use_linear_projection"):
        p["use_linear_in_transformer"] = True
    if sdxl:
        p.update(adm_in_channels=u["projection_class_embeddings_input_dim"],
                 num_classes="sequential", spatial_transformer_attn_type="softmax-xformers")
    return p


def _first_stage(v: dict, target: str) -> dict:
    ch = v["block_out_channels"]
    dd = {"double_z": True, "z_channels": v["latent_channels"], "resolution": 256, "in_channels": 3,
          "out_ch": 3, "ch": ch[0], "ch_mult": [c // ch[0] for c in ch],
          "num_res_blocks": v["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
    return {"target": target, "params": {"embed_dim": v["latent_channels"],
                                         "monitor": "val/rec_loss", "ddconfig": dd,
                                         "lossconfig": {"target": "torch.nn.Identity"}}}


def latent_diffusion(comp) -> dict:
    """SD 1.x / 2.x: v1-inference.yaml / v2-inference(-v).yaml with this model's shapes."""
    c, s = comp.configs, comp.configs["scheduler"]
    params = {"linear_start": s.get("beta_start", 0.00085), "linear_end": s.get("beta_end", 0.012),
              "num_timesteps_cond": 1, "log_every_t": 200,
              "timesteps": s.get("num_train_timesteps", 1000), "first_stage_key": "jpg",
              "cond_stage_key": "txt", "image_size": c["unet"]["sample_size"],
              "channels": c["unet"]["in_channels"], "cond_stage_trainable": False,
              "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
              "scale_factor": c["vae"]["scaling_factor"], "use_ema": False}
    if comp.spec.prediction_type == "v_prediction":
        params["parameterization"] = "v"
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                             "params": _unet_params(c["unet"], sdxl=False)}
    params["first_stage_config"] = _first_stage(c["vae"], "ldm.models.autoencoder.AutoencoderKL")
    params["cond_stage_config"] = TEXT_ENCODERS[comp.spec.family]
    return {"model": {"base_learning_rate": 1.0e-4,
                      "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def diffusion_engine(comp) -> dict:
    """SDXL: sd_xl_base.yaml with this model's shapes."""
    c = comp.configs
    sizes = [{"is_trainable": False, "input_key": key,
              "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
              "params": {"outdim": c["unet"]["addition_time_embed_dim"]}}
             for key in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")]
    text = [{"is_trainable": False, "input_key": "txt",
             "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
             "params": {"layer": "hidden", "layer_idx": 11}},
            {"is_trainable": False, "input_key": "txt",
             "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
             "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                        "layer": "penultimate", "always_return_pooled": True, "legacy": False}}]
    first = _first_stage(c["vae"], "sgm.models.autoencoder.AutoencoderKLInferenceWrapper")
    first["params"]["ddconfig"]["attn_type"] = "vanilla-xformers"
    denoiser = {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
        "num_idx": c["scheduler"].get("num_train_timesteps", 1000),
        "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
        "discretization_config": {
            "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}}
    params = {"scale_factor": c["vae"]["scaling_factor"], "disable_first_stage_autocast": True,
              "denoiser_config": denoiser,
              "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                                 "params": _unet_params(c["unet"], sdxl=True)},
              "conditioner_config": {"target": "sgm.modules.GeneralConditioner",
                                     "params": {"emb_models": text + sizes}},
              "first_stage_config": first}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}}


def render(comp) -> str:
    import yaml
    config = diffusion_engine(comp) if comp.spec.family == "sdxl" else latent_diffusion(comp)
    return MARKER + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def write_beside(checkpoint: str | Path, comp) -> Path | None:
    """Write `<name>.yaml` beside the checkpoint when the model needs one (a copy of the
    source's own when it had one). A stale one of ours is removed when none is needed."""
    target = Path(checkpoint).with_suffix(".yaml")
    text = comp.source_yaml if comp.source_yaml is not None else \
        render(comp) if needs_yaml(comp) else None
    if text is None:
        if target.is_file() and target.read_text(encoding="utf-8").startswith(MARKER):
            target.unlink()
        return None
    return write_text(target, text)
