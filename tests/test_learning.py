"""It learns the concept and keeps the class: measured eval losses on the tiny model.

A base model is first trained on 'class' pictures (blobs) under the class prompt, as a real base
model knows its classes. DreamBooth then teaches it a checker pattern under 'sks', with and
without prior preservation. Eval losses use fixed noise and timesteps.
"""
import pytest
from denoise import denoising_loss

from dreambooth import Concept, TrainingConfig, train
from dreambooth.model.single_file import load_single_file
from dreambooth.model.tiny import write_images

INSTANCE, CLASS = "photo of sks pattern", "photo of a pattern"


def eval_loss(checkpoint, folder, prompt) -> float:
    return denoising_loss(load_single_file(str(checkpoint), "v1x"), folder, prompt)


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
    # two instance images, 60 steps each: the same outcome as four and 80 in 57% of the time
    # (idle: 43 s, was 76 s; instance -59% with the prior, was -61%; class with the prior +2%,
    # was -22%, without it +47%, was +58%)
    write_images(instance, "checker", 2)
    write_images(klass, "blob", 8, seed=100)
    base = run(tmp_path, "base", tiny_source, Concept(str(klass), CLASS), 30)
    with_prior = run(tmp_path, "prior", base,
                     Concept(str(instance), INSTANCE, CLASS, str(klass), 2), 60)
    without = run(tmp_path, "noprior", base, Concept(str(instance), INSTANCE), 60)

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
