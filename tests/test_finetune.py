"""Captioned fine-tuning (no prior preservation): captions from metadata.jsonl and .txt, EMA
weights as the output, save precision, on the tiny model end to end."""
import json

import torch

from dreambooth import Concept, TrainingConfig
from dreambooth.config import events as ev
from dreambooth.model.checkpoint import read_checkpoint
from dreambooth.model.single_file import ldm_state
from dreambooth.model.tiny import write_images
from dreambooth.training.trainer import Trainer


def test_captioned_finetune_from_metadata_jsonl_with_ema_as_output(tiny_source, tmp_path):
    folder = tmp_path / "captioned"
    write_images(folder, "checker", 2)
    write_images(folder, "blob", 2)
    rows = [{"file_name": "checker_000.png", "text": "a red and blue checkerboard"},
            {"file_name": "checker_001.png", "text": "a small checkerboard, red"},
            {"file_name": "blob_000.png", "text": "a green blob on sand"}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows)
                                           + "\nnot json\n")
    (folder / "blob_001.txt").write_text("a green circle")  # a .txt beside the image wins
    cfg = TrainingConfig(model_name="ft", source_checkpoint=str(tiny_source),
                         work_dir=str(tmp_path / "runs"), output_dir=str(tmp_path / "out"),
                         resolution=64, batch_size=2, steps_per_image=1, learning_rate=1e-3,
                         use_ema=True, ema_decay=0.5, save_precision="bf16", hflip=True,
                         concepts=(Concept(str(folder), "[filewords]"),)).check()
    seen = []
    trainer = Trainer(cfg, ev.EventBus(seen.append), ev.CancelToken())
    result = trainer.run()
    prompts = {it.path.name: it.prompt for it in trainer.feed.items}
    assert prompts == {"checker_000.png": "a red and blue checkerboard",
                       "checker_001.png": "a small checkerboard, red",
                       "blob_000.png": "a green blob on sand", "blob_001.png": "a green circle"}
    assert any("metadata.jsonl" in getattr(e, "text", "") and "line 4" in e.text for e in seen)
    assert not trainer.feed.class_items and result.steps == 2
    saved, meta = read_checkpoint(result.path)
    unet = {k: v for k, v in saved.items() if k.startswith("model.diffusion_model.")}
    assert all(v.dtype == torch.bfloat16 for v in unet.values())
    ema = ldm_state(trainer.comp, trainer.unet_state())
    live = ldm_state(trainer.comp)
    assert all(torch.equal(v, ema[k].to(torch.bfloat16)) for k, v in unet.items())
    assert any(not torch.equal(v, live[k].to(torch.bfloat16)) for k, v in unet.items())
    assert json.loads(meta["dreambooth.config"])["use_ema"] is True
