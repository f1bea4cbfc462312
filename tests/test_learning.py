"""It learns the concept and keeps the class: measured eval losses on the tiny model.

A base model is first trained on 'class' pictures (blobs) under the class prompt, as a real base
model knows its classes. DreamBooth then teaches it a checker pattern under 'sks', with and
without prior preservation. Eval losses use fixed noise and timesteps.
"""
import random

import pytest
import torch

from dreambooth import Concept, TrainingConfig, train
from dreambooth.data.images import load_image, scan_images
from dreambooth.model.single_file import load_single_file
from dreambooth.model.tiny import write_images
from dreambooth.training.loss import compute_loss

INSTANCE, CLASS = "photo of sks pattern", "photo of a pattern"


def eval_loss(checkpoint, folder, prompt) -> float:
    from diffusers import DDPMScheduler
    comp = load_single_file(str(checkpoint), "v1x")
    comp.unet.eval()
    scheduler = DDPMScheduler.from_config(comp.configs["scheduler"])
    images, _ = scan_images(folder)
    with torch.no_grad():
        pixels = torch.stack([load_image(p, 64, True, random.Random(0)) for p in images])
        latents = comp.vae.encode(pixels).latent_dist.mean * comp.vae.config.scaling_factor
        ids = comp.tokenizer([prompt] * len(images), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        hidden = comp.text_encoder(ids)[0]
        g, total, steps = torch.Generator().manual_seed(123), 0.0, (50, 150, 300, 500)
        for t in steps:
            noise = torch.randn(latents.shape, generator=g)
            loss, _, _ = compute_loss(comp.unet, scheduler, latents, hidden, noise,
                                      torch.full((len(images),), t), len(images), 0.0)
            total += loss.item()
    return total / len(steps)


def run(root, name, source, concept, steps):
    cfg = TrainingConfig(model_name=name, source_checkpoint=str(source), work_dir=str(root / "w"),
                         output_dir=str(root / "o"), resolution=64, center_crop=True,
                         steps_per_image=steps, learning_rate=1e-3, concepts=(concept,), seed=0)
    return train(cfg).path


@pytest.mark.slow
@pytest.mark.once
def test_learns_the_concept_and_prior_preservation_keeps_the_class(tiny_source, tmp_path,
                                                                   no_network):
    instance, klass = tmp_path / "instance", tmp_path / "class"
    write_images(instance, "checker", 4)
    write_images(klass, "blob", 8, seed=100)
    base = run(tmp_path, "base", tiny_source, Concept(str(klass), CLASS), 30)
    with_prior = run(tmp_path, "prior", base,
                     Concept(str(instance), INSTANCE, CLASS, str(klass), 2), 80)
    without = run(tmp_path, "noprior", base, Concept(str(instance), INSTANCE), 80)

    i0, c0 = eval_loss(base, instance, INSTANCE), eval_loss(base, klass, CLASS)
    i1, c1 = eval_loss(with_prior, instance, INSTANCE), eval_loss(with_prior, klass, CLASS)
    i2, c2 = eval_loss(without, instance, INSTANCE), eval_loss(without, klass, CLASS)
    print(f"\nbase model:            instance loss {i0:.4f}  class loss {c0:.4f}"
          f"\nwith prior preservation: instance {i1:.4f} ({(i1 - i0) / i0:+.1%})"
          f"  class {c1:.4f} ({(c1 - c0) / c0:+.1%})"
          f"\nwithout:                 instance {i2:.4f} ({(i2 - i0) / i0:+.1%})"
          f"  class {c2:.4f} ({(c2 - c0) / c0:+.1%})")
    assert i1 <= 0.5 * i0, "the instance loss must fall by at least 50%"
    assert c1 <= 1.10 * c0, "with prior preservation the class loss must not rise over 10%"
    assert c2 - c0 > abs(c1 - c0), "without prior preservation the class must drift further"
