"""Progress for machines: lines (never a redrawn bar) where the console is not a terminal, and
--events-jsonl written as each event happens."""
from __future__ import annotations

import io
import json

import pytest

from dreambooth.config import events as ev
from dreambooth.host.progress import ConsoleProgress, JsonLines, LineProgress, console_progress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.once
def test_lines_every_n_steps_or_every_minute_and_the_last_step():
    out, clock = io.StringIO(), Clock()
    lines = LineProgress(out, every_steps=10, every_s=60.0, clock=clock)
    lines(ev.Started("m", 25, 25, 1, 0, resumed_from_step=0))
    for step in range(1, 26):
        clock.now += 100.0 if step == 13 else 1.0  # step 13 comes after a slow minute
        lines(ev.Step(step, 25, step, 0.5 if step == 10 else None, 1e-4, 1.0))
    lines(ev.CheckpointSaved("/x/m_25.safetensors", 25))
    text = out.getvalue()
    said = [line.split()[1] for line in text.splitlines() if line.startswith("step ")]
    assert said == ["10/25", "13/25", "20/25", "25/25"]
    assert "\r" not in text and "\x1b" not in text  # no bar redrawn, no cursor codes
    assert "step 20/25 (80%) loss 0.5000 lr 1.00e-04 1.00 steps/s eta 5s" in text
    assert text.splitlines()[0].startswith("Training m: 1 instance")
    assert text.splitlines()[-1] == "saved: /x/m_25.safetensors"


@pytest.mark.once
def test_a_terminal_gets_the_bar_anything_else_lines():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    assert type(console_progress(Terminal())) is ConsoleProgress
    assert type(console_progress(io.StringIO(), 5)) is LineProgress
    assert console_progress(io.StringIO(), 5).every_steps == 5


@pytest.mark.once
def test_events_jsonl_is_written_as_each_event_happens(tmp_path):
    target = tmp_path / "events.jsonl"
    stream = JsonLines(str(target))
    stream(ev.Started("m", 4, 4, 1, 0))
    stream(ev.Step(1, 4, 1, 0.25, 1e-4, 2.0))
    on_disk = [json.loads(line) for line in target.read_text().splitlines()]  # still open
    assert [e["event"] for e in on_disk] == ["started", "step"] and on_disk[1]["loss"] == 0.25
    stream.close()
