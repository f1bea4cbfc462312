"""Aspect-ratio bucketing: sizes, choice, no upscaling, batches of one bucket, the exact square
path when off, and SDXL's size/crop conditioning through a real training run."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth import Concept, TrainingConfig
from dreambooth.config import events as ev
from dreambooth.data.buckets import batch_count, bucket_sizes, choose, epoch_order, load_bucketed
from dreambooth.data.images import load_image
from dreambooth.model.tiny import pattern_image
from dreambooth.training.trainer import Trainer


@pytest.mark.parametrize("resolution", [128, 512, 768, 1024])
def test_bucket_sizes_are_multiples_of_64_within_the_area(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= resolution ** 2
        assert max(w / h, h / w) <= 2 and (h, w) in sizes
    if resolution == 512:
        assert {(384, 640), (640, 384), (448, 576), (256, 512)} <= set(sizes)


def test_each_image_gets_the_nearest_shape_and_is_never_enlarged_when_asked():
    sizes = bucket_sizes(512)
    assert choose((1024, 1024), sizes, False) == (512, 512)
    assert choose((1200, 800), sizes, False) == (640, 384)  # 1.5: nearer 1.67 than 1.29
    assert choose((800, 1600), sizes, False) == (320, 640)  # 1:2, the largest of that shape
    rng = random.Random(0)
    for _ in range(300):
        w, h = rng.randint(40, 2000), rng.randint(40, 2000)
        bw, bh = choose((w, h), sizes, True)
        assert bw % 64 == 0 and bh % 64 == 0
        if min(w, h) >= 64:
            assert max(bw / w, bh / h) <= 1.0, (w, h, bw, bh)  # the resize never enlarges
    assert choose((200, 150), sizes, True) == (192, 128)
    assert choose((200, 150), sizes, False) == (576, 448)  # without the option: enlarged


def test_every_batch_comes_from_one_bucket():
    rng = random.Random(3)
    buckets = [rng.choice([(64, 128), (128, 64), (128, 128)]) for _ in range(23)]
    for batch in (1, 2, 3, 4):
        order = epoch_order(buckets, batch, random.Random(batch), enabled=True)
        assert len(order) == batch * batch_count(buckets, batch, True)
        assert set(order) == set(range(23))
        for k in range(0, len(order), batch):
            assert len({buckets[i] for i in order[k:k + batch]}) == 1
    plain = epoch_order(buckets, 2, random.Random(5), False)
    assert plain == random.Random(5).sample(range(23), 23)


@pytest.mark.parametrize("center", [True, False])
def test_square_bucket_is_exactly_the_square_crop(tmp_path, center):
    path = tmp_path / "wide.png"
    pattern_image("blob", 96, 1).resize((150, 96)).save(path)
    a = load_image(path, 64, center, random.Random(7), flip=True)
    b, geometry = load_bucketed(path, (64, 64), center, random.Random(7), flip=True)
    assert torch.equal(a, b)
    assert geometry[:2] == (96, 150) and geometry[4:] == (64, 64)


def test_crop_conditioning_says_where_the_crop_is(tmp_path):
    path = tmp_path / "tall.png"
    Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[:, None, None], (1, 100, 3))).save(path)
    pixels, (oh, ow, top, left, th, tw) = load_bucketed(path, (64, 128), False, random.Random(1))
    assert (oh, ow, th, tw) == (200, 100, 128, 64) and left == 0  # scaled to 64 x 128 exactly
    pixels, (oh, ow, top, left, th, tw) = load_bucketed(path, (64, 64), False, random.Random(1))
    assert 0 <= top <= 128 - 64 and pixels.shape == (3, 64, 64)
    row = (pixels[0, 0, 0].item() + 1) * 127.5 * 128 / 200  # the first row's place in 64 x 128
    assert abs(row - top) < 2


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    for i, size in enumerate([(128, 64), (130, 66), (64, 128), (70, 140), (128, 128), (140, 130),
                              (90, 70)]):
        pattern_image("checker", 128, i).resize(size).save(folder / f"img_{i}.png")
    return folder


def test_sdxl_trains_on_buckets_with_size_conditioning(mixed_folder, tmp_path, tiny_checkpoints):
    source = tiny_checkpoints("sdxl")
    cfg = TrainingConfig(model_name="b", source_checkpoint=str(source), model_type="sdxl",
                         work_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"),
                         resolution=128, bucketing=True, bucket_no_upscale=True, batch_size=2,
                         steps_per_image=1, learning_rate=1e-4,
                         concepts=(Concept(str(mixed_folder), "photo of sks pattern"),)).check()
    seen, trainer = [], None
    trainer = Trainer(cfg, ev.EventBus(seen.append), ev.CancelToken())
    trainer.setup()
    buckets = {p.name: b for p, b in trainer.feed.bucket_of.items()}
    assert buckets["img_0.png"] == (128, 64) and buckets["img_2.png"] == (64, 128)
    assert buckets["img_6.png"] == (64, 64)  # 90x70: its own size, not enlarged to 128 wide
    assert any("Aspect-ratio buckets" in getattr(e, "text", "") for e in seen)
    trainer.rng, trainer.gen, trainer.feed.class_cursor = random.Random(0), torch.Generator(), 0
    order = epoch_order([trainer.feed.bucket_of[it.path] for it in trainer.feed.items], 2, trainer.rng, True)
    for b in range(trainer.batches_per_epoch):
        latents, cond, geometry, *_ = trainer.feed.batch(order, b, trainer.rng, trainer.gen)
        th, tw = geometry[0][4:]
        assert latents.shape[2:] == (th // 8, tw // 8) and len({g[4:] for g in geometry}) == 1
        assert cond["pooled"].shape == (2, 32) and cond["hidden"].shape == (2, 77, 64)
    result = trainer.loop(trainer.start_position())
    assert result.steps == trainer.total_steps == 4 and result.path.exists()
