"""A corpus of bad inputs, generated here: each gets a clear message naming what is at fault
(or is handled and said), never a traceback, never a file written under a final name."""
import errno
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth import Concept
from dreambooth.host.cli import main
from dreambooth.model.checkpoint import read_checkpoint, write_safetensors
from dreambooth.model.tiny import write_images

from tally import tally_fixture  # noqa: E402

pytestmark = pytest.mark.reliability
TALLY = {"tried": 0, "clear": 0, "handled": 0, "crashes": 0, "lost": 0}


report = tally_fixture("bad-input corpus", TALLY, ("crashes", "lost"))


def images_dir(tmp, name, count=1):
    folder = tmp / name
    write_images(folder, "checker", count)
    return folder


def png_with_header(width, height):
    """A PNG whose header claims width x height (no real pixel data behind it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) \
        + chunk(b"IEND", b"")


def save(img, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path.parent


def odd_image(tmp, kind):
    folder = tmp / kind
    rgb = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    if kind == "16bit":
        return save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), folder / "a.png")
    if kind == "cmyk":
        return save(Image.fromarray(rgb).convert("CMYK"), folder / "a.jpg")
    if kind == "palette":
        return save(Image.fromarray(rgb).convert("P"), folder / "a.png")
    if kind == "alpha":
        return save(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), folder / "a.png")
    if kind == "grayscale":
        return save(Image.fromarray(rgb[..., 0], "L"), folder / "a.webp")
    raise ValueError(kind)


def corrupt(tmp, kind):
    folder = images_dir(tmp, kind, 2)
    good = (folder / "checker_000.png").read_bytes()
    if kind == "truncated_png":
        (folder / "bad.png").write_bytes(good[: len(good) // 2])
        return folder, "bad.png"
    buf = io.BytesIO()
    Image.open(folder / "checker_000.png").save(buf, format="JPEG")
    if kind == "truncated_jpeg":
        (folder / "bad.jpg").write_bytes(buf.getvalue()[:200])
        return folder, "bad.jpg"
    if kind == "tiny_image":
        Image.new("RGB", (1, 1)).save(folder / "bad.png")
        return folder, "bad.png"
    if kind == "huge_header":
        (folder / "bad.png").write_bytes(png_with_header(20000, 20000))
        return folder, "bad.png"
    if kind == "renamed_text":
        (folder / "bad.jpg").write_text("not a picture")
        return folder, "bad.jpg"
    raise ValueError(kind)


def source_case(tmp, kind, tiny_source):
    state, meta = read_checkpoint(tiny_source)
    path = tmp / f"{kind}.safetensors"
    if kind == "not_a_checkpoint":
        path.write_bytes(b"\x00garbage" * 100)
    elif kind == "truncated":
        path.write_bytes(tiny_source.read_bytes()[:5000])
    elif kind == "other_type":
        fake = {"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1),
                **{k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}}
        write_safetensors(path, fake, meta)
    elif kind == "no_vae":
        write_safetensors(path, {k: v for k, v in state.items()
                                 if not k.startswith("first_stage_model.")}, meta)
    elif kind == "no_text_encoder":
        keep = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
        keep["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        write_safetensors(path, keep, meta)
    elif kind == "text_as_ckpt":
        path = tmp / "notes.ckpt"
        path.write_text("hello")
    elif kind == "empty_safetensors":
        write_safetensors(path, {"x": torch.zeros(1)})
    elif kind == "folder":
        path = tmp / "a_folder.safetensors"
        path.mkdir()
    elif kind == "txt_suffix":
        path = tmp / "model.txt"
        path.write_text("x")
    return path


# (case id, how to build the config, "error" words | ("ok", warning words))
def cases():
    c = []
    c.append(("empty_folder", lambda t, cfg, s: cfg.replace(concepts=(Concept(str(_mk(t / "e")), "sks"),)), "error", ["empty"]))
    c.append(("missing_folder", lambda t, cfg, s: cfg.replace(concepts=(Concept(str(t / "nope"), "sks"),)), "error", ["instance_data_dir", "not an existing folder"]))
    c.append(("only_text_files", lambda t, cfg, s: cfg.replace(concepts=(Concept(str(_text_folder(t)), "sks"),)), "error", ["none a readable image"]))
    for kind in ("truncated_png", "truncated_jpeg", "tiny_image", "huge_header", "renamed_text"):
        c.append((kind, lambda t, cfg, s, k=kind: _with_folder(cfg, corrupt(t, k)[0]), "ok", ["bad."]))
    for kind in ("16bit", "cmyk", "palette", "alpha", "grayscale"):
        c.append((kind, lambda t, cfg, s, k=kind: _with_folder(cfg, odd_image(t, k)), "ok", []))
    c.append(("case_twins", lambda t, cfg, s: _with_folder(cfg, _case_twins(t)), "ok", ["differ only in case"]))
    c.append(("non_utf8_caption", lambda t, cfg, s: _with_folder(cfg, _latin1_caption(t), "[filewords]"), "ok", ["not UTF-8"]))
    for kind in ("not_a_checkpoint", "truncated", "other_type", "no_vae", "no_text_encoder",
                 "text_as_ckpt", "empty_safetensors"):
        c.append(("source_" + kind, lambda t, cfg, s, k=kind: cfg.replace(source_checkpoint=str(source_case(t, k, s))), "error", []))
    c.append(("source_folder", lambda t, cfg, s: cfg.replace(source_checkpoint=str(source_case(t, "folder", s))), "error", ["source_checkpoint"]))
    c.append(("source_txt_suffix", lambda t, cfg, s: cfg.replace(source_checkpoint=str(source_case(t, "txt_suffix", s))), "error", ["source_checkpoint"]))
    c.append(("source_missing", lambda t, cfg, s: cfg.replace(source_checkpoint=str(t / "gone.safetensors")), "error", ["does not exist"]))
    for name in ("../escape", "/abs/path", "bad:name*", "x" * 300, "nul", " spaced "):
        c.append((f"model_name_{name[:10]}", lambda t, cfg, s, n=name: cfg.replace(model_name=n), "error", ["model_name"]))
    c.append(("negative_steps", lambda t, cfg, s: cfg.replace(steps_per_image=-3), "error", ["steps_per_image"]))
    c.append(("huge_resolution", lambda t, cfg, s: cfg.replace(resolution=100000), "error", ["resolution"]))
    c.append(("bad_optimizer", lambda t, cfg, s: cfg.replace(optimizer="sgd"), "error", ["optimizer", "adamw"]))
    c.append(("resume_missing", lambda t, cfg, s: cfg.replace(resume=str(t / "nostate")), "error", ["resume"]))
    return c


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def _text_folder(t):
    folder = _mk(t / "texts")
    (folder / "a.txt").write_text("x")
    (folder / "b.md").write_text("y")
    return folder


def _with_folder(cfg, folder, prompt="photo of sks pattern"):
    return cfg.replace(concepts=(Concept(str(folder), prompt),))


def _case_twins(t):
    folder = images_dir(t, "twins", 1)
    (folder / "CHECKER_000.PNG").write_bytes((folder / "checker_000.png").read_bytes())
    return folder


def _latin1_caption(t):
    folder = images_dir(t, "captions", 1)
    (folder / "checker_000.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return folder


@pytest.mark.parametrize("case", cases(), ids=lambda c: c[0])
def test_bad_input(case, quick_config, tiny_source, tmp_path, capsys):
    name, build, expect, words = case
    cfg = build(tmp_path, quick_config.replace(steps_per_image=1), tiny_source)
    TALLY["tried"] += 1
    try:
        code = main(["train", "--config", str(_write(tmp_path, cfg))])
    except BaseException:
        TALLY["crashes"] += 1
        raise
    err = capsys.readouterr().err
    assert "Traceback" not in err
    outputs = list((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else []
    if expect == "error":
        assert code in (1, 2) and "error:" in err, err
        assert all(w in err for w in words), err
        assert outputs == [], "nothing may be written under a final name"
        TALLY["clear"] += 1
    else:
        assert code == 0, err
        assert all(w in err for w in words), err
        TALLY["handled"] += 1


def _write(tmp, cfg):
    path = tmp / "run.json"
    path.write_text(cfg.to_json())
    return path


@pytest.mark.parametrize("text,words", [
    ('{"model_name": 5}', ["model_name", "text"]),
    ('{"steps_per_image": "ten"}', ["steps_per_image", "whole number"]),
    ('{"learning_rat": 1e-5}', ["did you mean 'learning_rate'"]),
    ('{"model_name": "x",}', ["line 1", "JSON"]),
    ('[1, 2]', ["JSON object"]),
    ('{"concepts": {"a": 1}}', ["concepts", "list"]),
    ('{"concepts": [{"instance_data_dir": 3, "instance_prompt": null}]}', ["concepts[0]"]),
])
def test_bad_config_files(text, words, tmp_path, capsys):
    TALLY["tried"] += 1
    path = tmp_path / "bad.json"
    path.write_text(text)
    code = main(["train", "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert all(w in err for w in words), err
    TALLY["clear"] += 1


def test_missing_config_file(tmp_path, capsys):
    TALLY["tried"] += 1
    assert main(["train", "--config", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    TALLY["clear"] += 1


@pytest.mark.parametrize("code_", [errno.EROFS, errno.ENOSPC])
def test_read_only_or_full_output_folder(code_, quick_config, tmp_path, monkeypatch, capsys):
    """Simulated (the tests run as root, which ignores permissions)."""
    from dreambooth.model import filecheck
    TALLY["tried"] += 1
    previous = tmp_path / "out" / "quick_4.safetensors"
    write_safetensors(previous, {"w": torch.ones(3)})
    before = previous.read_bytes()

    def failing_write(fh, *args, **kwargs):  # the checkpoint's write, cut off halfway
        fh.write(b"partial")
        raise OSError(code_, "simulated")
    monkeypatch.setattr(filecheck, "write_streamed", failing_write)
    code = main(["train", "--config", str(_write(tmp_path, quick_config.replace(
        steps_per_image=1, overwrite=True)))])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "Writing" in err, err
    if previous.read_bytes() != before:
        TALLY["lost"] += 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["quick_4.safetensors"]
    TALLY["clear"] += 1


def test_exif_rotated_photo_is_trained_upright(tmp_path):
    import random

    from dreambooth.data.images import load_image
    TALLY["tried"] += 1
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 32, 32))  # left half blue when upright
    stored = img.rotate(90, expand=True)  # the camera stored it sideways...
    exif = Image.Exif()
    exif[0x0112] = 8  # ...and says: rotate 90 degrees clockwise to view
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif)
    pixels = load_image(path, 32, True, random.Random(0))
    assert pixels.shape == (3, 32, 32)
    upright = load_image(path, 32, False, random.Random(0))
    assert upright[2].mean() > 0  # blue present
    TALLY["handled"] += 1
