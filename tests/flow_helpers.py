"""What the Flux and SD3.5 tests share: the full-size transformers' configs, a tiny LoRA run's
config, and the check that the memory estimate of a reduced-depth, full-width model is the step
profile's count."""
from __future__ import annotations

from dreambooth import Concept, TrainingConfig

# FLUX.1-dev's and SD3.5 medium's / large's transformers (diffusers' configs)
FLUX_FULL = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))
MEDIUM = dict(num_layers=24, attention_head_dim=64, num_attention_heads=24,
              joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
              out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
              qk_norm="rms_norm")
LARGE = dict(num_layers=38, attention_head_dim=64, num_attention_heads=38,
             joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
             out_channels=16, pos_embed_max_size=192, dual_attention_layers=(),
             qk_norm="rms_norm")


def flow_lora_config(family: str, files: dict, instance_dir, tmp_path, /,
                     **changes) -> TrainingConfig:
    """A LoRA run on a tiny flow model's `files` (`family`: its model type, which `changes`
    may set to another of the family): rank 2, 32 px, one step an image."""
    settings = dict(model_name=family.split("-")[0].replace(".", ""), model_type=family,
                    method="lora", work_dir=str(tmp_path / "runs"),
                    lora_dir=str(tmp_path / "Lora"), resolution=32, center_crop=True,
                    batch_size=1, steps_per_image=1, lora_rank=2, lora_alpha=4.0,
                    lora_learning_rate=1e-2,
                    concepts=(Concept(str(instance_dir), "photo of sks dog"),), **files)
    return TrainingConfig(**{**settings, **changes})


def estimate_is_the_count(case, configs: dict, blocks: tuple, tmp_path) -> None:
    """Profile `case` on a model of `configs` (`blocks` deep, full width) under 'lowest': no
    host sync in the step, one at the losses' read, and the estimate of its training step
    within 10% of the peak the step holds."""
    from bench.profile import make_config, profile_case
    from dreambooth.training import memory_flux
    from dreambooth.training.memory import GIB
    r = profile_case(case, None, configs, python_calls=False)
    assert r["settings"]["fp8_base"] and r["settings"]["gradient_checkpointing"]
    assert r["host_syncs"] == 0, r["syncs_by_kind"]
    assert r["read_syncs"] == 1 and r["ops"] > 1000
    cfg = make_config(case, case.resolution, tmp_path)
    counted, parts, _ = memory_flux.flow_peak(cfg, (1, 0), 1.0, 0, blocks, caching=False)
    assert abs(counted / r["peak_bytes"] - 1) <= 0.10, (counted / GIB, parts, r["peak_gib"])
