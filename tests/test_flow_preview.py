"""A Flux / SD3.5 run's class images and previews are drawn with the sampler settings Forge uses
by default (lllyasviel/stable-diffusion-webui-forge dfdcbab6): its 'Euler' sampler on its
'Simple' schedule over its flow predictors' tables, Flux dev's distilled CFG 3.5 (CFG 1), SD3.5's
CFG 7, 20 steps; a guidance_scale the user set is kept."""
import math

import numpy as np
import pytest
import torch

from dreambooth.config.flux import sample_guidance
from dreambooth.data.sampling import generate_images, make_pipeline, sample_settings
from dreambooth.model.workdir import load_model
from flow_helpers import flow_lora_config
from test_flux import tiny_flux  # noqa: F401 (the session's tiny Flux)
from test_sd35 import tiny_medium  # noqa: F401


def forge_simple(model_type: str, steps: int) -> list[float]:
    """Forge's own way: its predictor's table (PredictionFlux: 10 000 levels through diffusers'
    time_shift at mu; PredictionDiscreteFlow: 1000 timesteps shifted by 3.0), of which
    simple_scheduler takes the entry -(1 + int(x * len / steps)) for step x, then 0."""
    if model_type.startswith("flux"):
        mu = {"flux-dev": 1.15, "flux-schnell": 1.0}[model_type]
        t = torch.arange(1, 10001, dtype=torch.float64) / 10000
        table = math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    else:
        t = torch.arange(1, 1001, dtype=torch.float64) / 1000
        table = 3.0 * t / (1 + (3.0 - 1) * t)
    ss = len(table) / steps
    return [float(table[-(1 + int(x * ss))]) for x in range(steps)] + [0.0]


def _drawn(files, model_type, tmp_path, steps=3):
    """The tiny model's preview settings and what its transformer was given for one image of
    `steps` steps at 32 px (the config leaving guidance_scale and sample_steps as they are)."""
    cfg = flow_lora_config(model_type, files, tmp_path, tmp_path)
    assert cfg.sample_steps == cfg.class_generation_steps == 20  # (Forge's 'Sampling steps')
    comp, _ = load_model(cfg, lambda *a: None, dtype=None)
    pipe = make_pipeline(comp)
    seen = []
    comp.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["timestep"].clone(), kw.get("guidance"),
                                      kw["hidden_states"].shape[0])), with_kwargs=True)
    guidance, extra = sample_settings(comp, cfg.guidance_scale)
    generate_images(pipe, "photo of a dog", 1, tmp_path, "x", 0, 32, steps, guidance, 0,
                    extra=extra)
    return comp, pipe, guidance, seen


@pytest.mark.once
def test_flux_dev_previews_as_forge_draws(tiny_flux, tmp_path):
    """Flux dev: distilled guidance 3.5 in the transformer's guidance input and no CFG (one
    batch), the timesteps Forge's Simple schedule gives at mu 1.15 whatever the image's size
    (3 steps: its table's truncation, not diffusers' linspace); a set guidance_scale is kept."""
    comp, pipe, guidance, seen = _drawn(tiny_flux, "flux-dev", tmp_path)
    want = forge_simple("flux-dev", 3)
    assert guidance == 3.5 and [float(g) for _, g, _ in seen] == [3.5] * 3
    assert {n for *_, n in seen} == {1}  # (CFG 1: the prompt only)
    given = torch.cat([t for t, _, _ in seen]).double()
    torch.testing.assert_close(given, torch.tensor(want[:-1], dtype=torch.float64),
                               rtol=0, atol=1e-6)  # (the pipeline gives the transformer t / 1000)
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), torch.tensor(want).double(),
                               rtol=0, atol=1e-6)
    # diffusers' own FLUX.1-dev schedule shifts by the image's size (32 px: mu 0.5), not Forge's
    own = comp.noise_scheduler()
    own.set_timesteps(sigmas=np.array([1.0, 2 / 3, 1 / 3]), mu=0.5 + 0.65 * (4 - 256) / 3840)
    assert abs(float(own.sigmas[1]) - want[1]) > 0.1
    assert sample_settings(comp, 5.0)[0] == 5.0 and sample_guidance("flux-schnell", 7.5) == 0


@pytest.mark.once
def test_sd35_previews_as_forge_draws(tiny_medium, tmp_path):
    """SD3.5: CFG 7 (prompt and negative in one batch), the timesteps of Forge's Simple schedule
    at shift 3.0 (not the scheduler's own spacing, whose last level is near 0); schnell's
    levels as Forge's at mu 1.0 (diffusers' FLUX.1-schnell does not shift)."""
    from dreambooth.data.sampling import forge_scheduler
    from dreambooth.model import flux
    from dreambooth.model.spec import spec_for
    comp, pipe, guidance, seen = _drawn(tiny_medium, "sd3.5-medium", tmp_path)
    want = forge_simple("sd3.5-medium", 3)
    assert guidance == 7.0 and pipe.guidance_scale == 7.0 and {n for *_, n in seen} == {2}
    given = torch.cat([t[:1] for t, _, _ in seen]).double() / 1000
    torch.testing.assert_close(given, torch.tensor(want[:-1], dtype=torch.float64),
                               rtol=0, atol=1e-6)
    own = comp.noise_scheduler()
    own.set_timesteps(3)
    assert abs(float(own.sigmas[-2]) - want[-2]) > 0.3
    schnell = type("C", (), {"configs": {"scheduler": flux.scheduler_config(
        spec_for("flux-schnell"))}, "spec": spec_for("flux-schnell")})
    scheduler = forge_scheduler(schnell)
    scheduler.set_timesteps(20, mu=0.7)
    torch.testing.assert_close(scheduler.sigmas.double(),
                               torch.tensor(forge_simple("flux-schnell", 20)).double(),
                               rtol=0, atol=1e-6)
