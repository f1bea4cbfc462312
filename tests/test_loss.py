"""The objective: instance mse + prior_weight x class mse, epsilon or v target, checked by hand."""
import pytest
import torch

from dreambooth.model.components import build_random
from dreambooth.model.tiny import tiny_configs
from dreambooth.training.loss import compute_loss, dreambooth_loss, snr_weights


def independent_loss(unet, alphas_cumprod, latents, hidden, noise, t, n_inst, w, kind):
    """Textbook formulas, no diffusers scheduler involved."""
    a = alphas_cumprod[t].double().view(-1, 1, 1, 1)
    x, n = latents.double(), noise.double()
    noisy = (a.sqrt() * x + (1 - a).sqrt() * n).float()
    pred = unet(noisy, t, hidden).sample.double()
    target = n if kind == "epsilon" else a.sqrt() * n - (1 - a).sqrt() * x
    sq = (pred - target) ** 2
    inst = sq[:n_inst].sum() / sq[:n_inst].numel()
    prior = sq[n_inst:].sum() / sq[n_inst:].numel()
    return (inst + w * prior).item()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_first_step_loss_matches_an_independent_computation(kind):
    from diffusers import DDPMScheduler
    configs = tiny_configs("v1x")
    configs["scheduler"]["prediction_type"] = kind
    comp = build_random("v1x", configs, seed=3)
    scheduler = DDPMScheduler.from_config(configs["scheduler"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    hidden = torch.randn(4, 77, 32, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999, 250])
    ours, inst, prior = compute_loss(comp.unet, scheduler, latents, hidden, noise, t, 2, 0.7)
    expected = independent_loss(comp.unet, scheduler.alphas_cumprod, latents, hidden, noise, t,
                                2, 0.7, kind)
    assert abs(ours.item() - expected) < 1e-5
    assert abs(ours.item() - (inst.item() + 0.7 * prior.item())) < 1e-6


def test_without_class_half_the_loss_is_the_instance_mse():
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    total, inst, prior = dreambooth_loss(pred, target, 3, 1.0)
    assert torch.allclose(total, ((pred - target) ** 2).mean())
    assert prior.item() == 0.0


def test_min_snr_weights_cap_the_easy_timesteps():
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler.from_config(tiny_configs("v1x")["scheduler"])
    w = snr_weights(scheduler, torch.tensor([1, 999]), gamma=5.0)
    assert w[0] < 1.0 and abs(w[1].item() - 1.0) < 1e-6
