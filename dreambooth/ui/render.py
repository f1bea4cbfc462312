"""HTML for the tab: progress bar, loss chart (inline SVG), banners. Standard library only,
the same markup under every gradio version."""
from __future__ import annotations

import html

from ..host.runstate import Progress, ending

STATE_WORDS = {"idle": "Ready", "starting": "Starting (loading the model)", "running": "Training",
               "cancelling": "Cancelling: stopping after this step and saving",
               "finished": "Finished", "cancelled": "Cancelled", "stopped": "Stopped",
               "failed": "Failed"}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_html(p: Progress) -> str:
    frac = p.step / p.total_steps if p.total_steps else 0.0
    pct = f"{100 * min(max(frac, 0.0), 1.0):.1f}"
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    stats = [("Step", f"{p.step} / {p.total_steps or '?'}"), ("it/s", f"{p.it_per_s:.2f}"),
             ("ETA", duration(p.eta_s)), ("Loss", loss)]
    if p.device not in ("", "cpu"):  # a CPU run has no VRAM to show
        stats.append(("VRAM", f"{p.vram_gb:.2f} GB"))
    cells = "".join(f"<span class='dreambooth-stat'><b>{html.escape(k)}</b> "
                    f"<span data-stat='{html.escape(k.lower())}'>{html.escape(v)}</span></span>"
                    for k, v in stats)
    words = STATE_WORDS.get(p.state, p.state)
    if p.state == "cancelling" and p.stop_step is not None:
        words = f"Cancelling: stopped at step {p.stop_step}, saving"
    if p.saving and p.active:
        words = "Saving the resume state…" if p.saving_what == "state" else \
            f"Saving {p.saving.replace(chr(92), '/').rsplit('/', 1)[-1]}…"
    state = html.escape(words)
    return (f"<div class='dreambooth-progress' data-state='{html.escape(p.state)}' "
            f"data-step='{p.step}' data-total='{p.total_steps}'>"
            f"<div class='dreambooth-state'>{state}</div>"
            f"<div class='dreambooth-bar'><div class='dreambooth-bar-fill' "
            f"style='width:{pct}%'></div></div>"
            f"<div class='dreambooth-stats'>{cells}</div></div>")


def loss_svg(losses: list, width: int = 480, height: int = 160) -> str:
    """A line chart of [step, loss] pairs; empty placeholder before the first step."""
    if len(losses) < 2:
        return ("<div class='dreambooth-loss dreambooth-loss-empty'>The loss chart appears "
                "after the first steps.</div>")
    steps = [float(s) for s, _ in losses]
    values = [float(v) for _, v in losses]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 28
    def xy(s: float, v: float) -> str:
        x = pad + (s - x0) / max(x1 - x0, 1e-12) * (width - 2 * pad)
        y = height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad)
        return f"{x:.1f},{y:.1f}"
    points = " ".join(xy(s, v) for s, v in zip(steps, values))
    return (f"<div class='dreambooth-loss'><svg viewBox='0 0 {width} {height}' width='100%' "
            f"height='{height}' role='img' aria-label='loss per step'>"
            f"<polyline fill='none' stroke='currentColor' stroke-width='1.5' points='{points}'/>"
            f"<text x='2' y='14' font-size='11'>{y1:.3f}</text>"
            f"<text x='2' y='{height - 4}' font-size='11'>{y0:.3f}</text>"
            f"<text x='{width - pad}' y='{height - 4}' font-size='11' text-anchor='end'>"
            f"step {int(x1)}</text></svg></div>")


def banner(kind: str, title: str, lines: list[str] | tuple = (), command: str = "",
           checkpoint: str = "") -> str:
    """kind: error | warning | info | success. `checkpoint`: the title of a checkpoint the host
    now uses; the page's script (javascript/dreambooth.js) shows it in the host's own dropdown."""
    body = "".join(f"<li>{html.escape(str(l))}</li>" for l in lines)
    cmd = f"<pre class='dreambooth-fix'>{html.escape(command)}</pre>" if command else ""
    data = f" data-checkpoint='{html.escape(checkpoint, quote=True)}'" if checkpoint else ""
    return (f"<div class='dreambooth-banner dreambooth-{html.escape(kind)}'{data}>"
            f"<b>{html.escape(title)}</b>{'<ul>' + body + '</ul>' if body else ''}{cmd}</div>")


def result_html(p: Progress) -> str:
    if p.state == "failed":
        return banner("error", p.error or "Training failed.", [p.hint] if p.hint else
                      p.messages[-10:])
    warnings = [m for m in p.messages if m.startswith("warning")][-5:]
    if p.state == "finished" and p.final_path:
        earlier = [f"also saved: {s}" for s in p.saved if s != p.final_path]
        return banner("success", f"Saved: {p.final_path}", earlier + warnings)
    if p.state in ("cancelled", "stopped"):
        title, lines = ending(p)
        kind = "warning" if p.state == "stopped" or p.stop else \
            "success" if p.final_path else "info"
        return banner(kind, title, lines + warnings)
    return ""
