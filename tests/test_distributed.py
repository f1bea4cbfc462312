"""Multi-process training is accelerate's, with no code path of our own: `torchrun -m dreambooth
train` on 2 CPU processes (gloo) must give the result of 1 process with the same global batch,
and only rank 0 may write files.

At 128 px, not the tiny model's usual 64: at 64 px its deepest feature maps are 1x1, where a
group norm over one or two values is so ill-conditioned that float rounding (which differs
between a batch of 4 and two batches of 2) changes gradients by ~0.5%, and AdamW's normalised
steps turn near-zero gradients into full-size ones. At 128 px the two runs agree to ~1e-3 in
the weights and ~1e-5 in what the UNet computes; a run with another batch differs by ~50-100%.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from patience import deadline
import torch

pytestmark = pytest.mark.slow

# Logs, per rank, every file-system write under $DB_AUDIT_WATCH (audit hooks see them all:
# open for writing, mkstemp, rename/replace, mkdir, remove, copyfile), dumped at exit.
AUDIT = textwrap.dedent('''
    import atexit, os, sys
    _watch, _log, _rank = (os.environ.get(k) for k in ("DB_AUDIT_WATCH", "DB_AUDIT_LOG", "RANK"))
    if _watch and _log and _rank is not None:
        _watch, _seen = os.path.realpath(_watch), []

        def _under(p):
            try:
                p = os.path.realpath(os.fsdecode(os.fspath(p)))
            except TypeError:
                return None
            return p if p == _watch or p.startswith(_watch + os.sep) else None

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \\
                    (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                paths = [path] if writes else []
            elif event == "os.mkdir":
                paths = [] if isinstance(args[0], int) or os.path.isdir(args[0]) else [args[0]]
            elif event in ("os.rename", "shutil.copyfile"):
                paths = [args[1]]
            elif event in ("os.remove", "tempfile.mkstemp"):
                paths = [args[0]]
            else:
                return
            _seen.extend(f"{event} {p}" for p in map(_under, paths) if p)

        def _dump():
            fd = os.open(f"{_log}.{_rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.write(fd, "\\n".join(_seen).encode())
            os.close(fd)

        sys.addaudithook(_hook)
        atexit.register(_dump)
''')


def _config(tmp: Path, name: str, batch_size: int, source, instance_dir, class_dir):
    from dreambooth import Concept, TrainingConfig
    return TrainingConfig(
        model_name=name, source_checkpoint=str(source), work_dir=str(tmp / f"runs_{name}"),
        output_dir=str(tmp / f"out_{name}"), resolution=128, center_crop=True, steps_per_image=1,
        batch_size=batch_size, learning_rate=1e-3, sample_every_epochs=1,
        sample_steps=2, class_generation_steps=2,
        concepts=(Concept(str(instance_dir), "photo of sks pattern", "photo of a pattern",
                          str(class_dir), 1),))


def _unet_out(path) -> torch.Tensor:
    from dreambooth.model.single_file import load_single_file
    unet = load_single_file(str(path), "v1x").unet.eval()
    g = torch.Generator().manual_seed(1)
    x, hidden = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 300, 600, 900]), hidden).sample


def _unet_update(path, source) -> torch.Tensor:
    from safetensors.torch import load_file
    after, before = load_file(str(path)), load_file(str(source))
    keys = sorted(k for k in after if k.startswith("model.diffusion_model."))
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in keys])


def _run_two_processes(tmp: Path, config_path: Path, watch: Path) -> dict:
    audit = tmp / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    path = os.pathsep.join([str(audit), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, DB_AUDIT_WATCH=str(watch),
               DB_AUDIT_LOG=str(tmp / "writes"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreambooth", "train", "--config", str(config_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=deadline(100))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {rank: [line for line in (tmp / f"writes.{rank}").read_text().splitlines() if line]
            for rank in (0, 1)}


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_source, instance_dir):
    from dreambooth import train
    watch = tmp_path / "two"
    two = _config(watch, "two", 1, tiny_source, instance_dir, watch / "class")
    config_path = tmp_path / "two.json"
    config_path.write_text(two.to_json())

    writes = _run_two_processes(tmp_path, config_path, watch)

    assert writes[1] == [], f"rank 1 wrote files: {writes[1][:5]}"
    written = "\n".join(writes[0])
    final = watch / "out_two" / "two_2.safetensors"
    assert final.is_file() and str(final) in written
    assert "class_00000.png" in written and "step000002_c0" in written  # class images, samples
    assert json.loads((watch / "runs_two" / "two" / "working" / "dreambooth_model.json")
                      .read_text())["revision"] == 2

    # one process, batch 2, the same class images (made by the 2-process run)
    one = _config(tmp_path, "one", 2, tiny_source, instance_dir, watch / "class")
    result = train(one)
    assert result.path.name == "one_2.safetensors"

    a, b = _unet_update(result.path, tiny_source), _unet_update(final, tiny_source)
    assert (a - b).norm() / a.norm() < 0.01  # measured ~1e-3; another batch: ~1
    source_out, one_out, two_out = (_unet_out(p) for p in (tiny_source, result.path, final))
    assert (one_out - two_out).norm() / (one_out - source_out).norm() < 1e-3  # ~2e-5; vs ~0.5
