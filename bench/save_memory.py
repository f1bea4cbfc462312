"""Peak resident memory of saving a full fine-tune as one .safetensors file (issue 21, part 6).

A fresh interpreter builds a randomly initialised model (SD1.5's real architecture, fp32, or
the tiny one with --smoke), lets go of what building it left (gc, malloc_trim) and reads its
resident memory: `held_rss_gb`, what a run holds before it saves (a training run holds more:
its optimizer, the data). Then, for each writer, the kernel's peak (VmHWM) is reset to the
current RSS, the checkpoint is written, and the peak read back:
- `streamed`: save_single_file as it is (one tensor at a time, model/streamed.py);
- `previous`: what a save did before: every tensor cast up front (cast_for_save), then
  safetensors' save_file, as installed;
- `previous_safetensors_0_4`: the same, with every tensor first copied to bytes, as
  safetensors before 0.6 writes (AUTOMATIC1111 1.10 pins 0.4.2; its 0.8 writes from the
  tensors' memory).
The bound of issue 21: a save's peak <= the RSS before it + 10%.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1.10
WRITERS = ("streamed", "previous", "previous_safetensors_0_4")


def _status(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


def _settle() -> int:
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay counted
        pass
    return _status("VmRSS")


def _reset_peak() -> None:
    """VmHWM back to the current RSS (Linux >= 4.0: '5' to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


def _previous(comp, path: Path, precision: str, to_bytes: bool) -> None:
    import torch
    from safetensors.torch import save_file

    from dreambooth.model.checkpoint import cast_for_save
    from dreambooth.model.single_file import ldm_state
    state = cast_for_save(ldm_state(comp), precision, comp.spec.buffers)
    held = [t.reshape(-1).view(torch.uint8).numpy().tobytes()
            for t in state.values()] if to_bytes else []
    save_file(state, str(path), metadata={"format": "pt"})
    del held, state


def child(smoke: bool, folder: str, precision: str) -> None:
    """Runs in the fresh interpreter: prints the figures as one JSON line."""
    import safetensors

    from bench.cases import build_model
    from dreambooth.model.single_file import save_single_file
    comp = build_model(smoke)
    model = sum(t.numel() * t.element_size() for m in (comp.unet, comp.vae, *comp.text_encoders)
                for t in m.state_dict().values())
    out = {"precision": precision, "model_gb": model / 1e9,
           "safetensors": safetensors.__version__}
    for writer in WRITERS:
        path = Path(folder) / f"{writer}.safetensors"
        held = _settle()
        _reset_peak()
        if writer == "streamed":
            save_single_file(comp, path, precision, overwrite=True)
        else:
            _previous(comp, path, precision, to_bytes=writer.endswith("0_4"))
        out.setdefault("held_rss_gb", held / 1e9)
        out[f"{writer}_peak_rss_gb"] = _status("VmHWM") / 1e9
        out[f"{writer}_extra_gb"] = (_status("VmHWM") - held) / 1e9
        out.setdefault("file_gb", path.stat().st_size / 1e9)
        path.unlink()
    print(json.dumps(out))


def measure_save_memory(smoke: bool, work: Path, precisions=("fp32", "fp16")) -> list[dict]:
    """One fresh interpreter per precision; each row with the bound and whether it holds."""
    rows = []
    for precision in precisions:
        code = f"from bench.save_memory import child; child({smoke!r}, {str(work)!r}, " \
               f"{precision!r})"
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                              capture_output=True, text=True, timeout=1800)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        row["bound_gb"] = round(row["held_rss_gb"] * BOUND, 3)
        row["within_bound"] = row["streamed_peak_rss_gb"] <= row["bound_gb"]
        rows.append(row)
    return rows


def describe(r: dict) -> str:
    return (f"{'save ' + r['precision']:<18} {r['file_gb']:.2f} GB file from a "
            f"{r['model_gb']:.2f} GB model; RSS before {r['held_rss_gb']:.2f} GB, peak while "
            f"saving {r['streamed_peak_rss_gb']:.2f} GB (+{r['streamed_extra_gb']:.3f}; bound "
            f"{r['bound_gb']:.2f} GB, {'within' if r['within_bound'] else 'OVER'}); before: "
            f"{r['previous_peak_rss_gb']:.2f} GB with safetensors {r['safetensors']}, "
            f"{r['previous_safetensors_0_4_peak_rss_gb']:.2f} GB as safetensors 0.4 writes")
