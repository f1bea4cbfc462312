"""Training in a child process: `python -m dreambooth train --config run.json --events-jsonl -`.

The child runs with the host's interpreter and our lib folder first on its path, so the host
process never imports torch or diffusers; all GPU memory is returned when it exits; a crash in
training can't take the host down. Its JSON-line events become a `Progress` snapshot; cancel is
SIGINT (a clean stop that still saves), then SIGTERM after a grace period. Standard library only.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import TrainingConfig
from ..config import events as ev
from ..config.errors import DreamboothError
from ..config.folders import claim_model_dir
from .interface import Host

MAX_LOSSES = 2000  # loss history kept for the chart (older points are thinned)
MAX_LOG_LINES = 200


@dataclass
class Progress:
    """Everything the tab and the API show about a run, as plain data."""

    state: str = "idle"  # idle | starting | running | cancelling | finished | cancelled | failed
    model_name: str = ""
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float = 0.0
    eta_s: float | None = None
    vram_gb: float = 0.0
    device: str = ""  # from Started: cpu | cuda | ...
    losses: list = field(default_factory=list)  # [step, loss] pairs
    samples: list = field(default_factory=list)  # newest last
    saved: list = field(default_factory=list)
    saving: str = ""  # the file being written now
    final_path: str = ""
    error: str = ""
    hint: str = ""
    messages: list = field(default_factory=list)
    returncode: int | None = None
    run_dir: str = ""

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "cancelling")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["active"] = self.active
        return d


def apply_event(p: Progress, event: ev.Event) -> None:
    """Fold one event into the progress snapshot (a pure function of the stream)."""
    if isinstance(event, ev.Started):
        p.state, p.total_steps, p.model_name = "running", event.total_steps, event.model_name
        p.step, p.device = event.resumed_from_step, event.device
    elif isinstance(event, ev.Step):
        p.step, p.total_steps, p.epoch = event.step, event.total_steps, event.epoch
        p.lr, p.it_per_s, p.vram_gb = event.lr, event.it_per_s, event.vram_gb
        left = max(event.total_steps - event.step, 0)
        p.eta_s = left / event.it_per_s if event.it_per_s > 0 else None
        if event.loss is not None:  # read every log_every_steps: the last known one stays
            p.loss = event.loss
            p.losses.append([event.step, event.loss])
            if len(p.losses) > MAX_LOSSES:
                p.losses = p.losses[::2]
    elif isinstance(event, ev.SampleSaved):
        p.samples.append(event.path)
    elif isinstance(event, ev.Saving):
        p.saving = event.path
    elif isinstance(event, ev.CheckpointSaved):
        p.saved.append(event.path)
        p.saving = ""
    elif isinstance(event, ev.Message):
        p.messages.append(("warning: " if event.level == "warning" else "") + event.text)
    elif isinstance(event, ev.Finished):
        p.final_path, p.saving = event.path, ""
        p.state = "cancelled" if event.cancelled else "finished"
        p.eta_s = 0.0
    elif isinstance(event, ev.Failed):
        p.state, p.error, p.hint = "failed", event.message, event.hint


class TrainingRun:
    """One child training process and the thread that reads its events."""

    def __init__(self, config: TrainingConfig, run_dir: Path, python: str = sys.executable,
                 pythonpath: list[str] | None = None) -> None:
        self.config, self.run_dir = config, Path(run_dir).resolve()
        self.python, self.pythonpath = python, list(pythonpath or [])
        self.progress = Progress(model_name=config.model_name, run_dir=str(run_dir))
        self.log_lines: list[str] = []
        self._lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._cancel_grace: float | None = None  # set by cancel(), even before the start
        self._signalled = False
        self._save_started = 0.0  # when the newest Saving event came (monotonic)

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", "dreambooth", "train", "--config",
                str(self.run_dir / "run.json"), "--events-jsonl", "-"]

    def child_env(self) -> dict:
        env = dict(os.environ)
        parts = self.pythonpath + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    def start(self) -> "TrainingRun":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run.json").write_text(self.config.to_json(), encoding="utf-8")
        self.progress.state = "starting"
        self._stderr = open(self.run_dir / "train.log", "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=self.child_env(),
                                     text=True, encoding="utf-8",
                                     errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._read, name="dreambooth-events", daemon=True)
        self._reader.start()
        if self._cancel_grace is not None:
            threading.Thread(target=self.cancel, args=(self._cancel_grace,), daemon=True).start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with open(self.run_dir / "events.jsonl", "w", encoding="utf-8") as record:
            for line in self.proc.stdout:
                line = line.strip()
                if not line:
                    continue
                event = _parse(line)
                with self._lock:
                    if event is None:
                        self.log_lines = (self.log_lines + [line])[-MAX_LOG_LINES:]
                    else:
                        record.write(line + "\n")
                        apply_event(self.progress, event)
                        if isinstance(event, ev.Saving):
                            self._save_started = time.monotonic()
        code = self.proc.wait()
        self._stderr.close()
        with self._lock:
            self._finish(code)

    def _finish(self, code: int) -> None:
        p = self.progress
        p.returncode = code
        if p.state in ("starting", "running", "cancelling"):
            if p.state == "cancelling":
                p.state = "cancelled"
            else:
                p.state = "failed"
                p.error = p.error or f"The training process ended with exit code {code}."
                p.hint = p.hint or "See the log below (or train.log in the run folder)."
        if p.state == "failed" and not p.messages:
            p.messages = self.stderr_tail(20)

    def snapshot(self) -> Progress:
        with self._lock:
            return dataclasses.replace(self.progress, losses=list(self.progress.losses),
                                       samples=list(self.progress.samples),
                                       saved=list(self.progress.saved),
                                       messages=list(self.progress.messages))

    def stderr_tail(self, n: int = 40) -> list[str]:
        try:
            text = (self.run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        lines = [l for l in text.replace("\r", "\n").split("\n") if l.strip()]
        return lines[-n:]

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> Progress:
        if self._reader is not None:
            self._reader.join(timeout)
        return self.snapshot()

    def cancel(self, grace_s: float = 30.0) -> None:
        """SIGINT (the child stops after the current step and saves), SIGTERM after `grace_s`,
        and a kill if even that is ignored for `grace_s` more."""
        with self._lock:  # one SIGINT only: the child takes a second one as "stop at once"
            self._cancel_grace = grace_s
            self.progress.state = "cancelling" if self.progress.active else self.progress.state
            if self.proc is None or self._signalled:
                return
            self._signalled = True
        if not self.running():
            return
        _interrupt(self.proc)
        for sig_step in (_terminate, _kill):
            if self._wait_out(grace_s):
                return
            sig_step(self.proc)

    def _wait_out(self, grace_s: float) -> bool:
        """Wait until the child ends (True) or `grace_s` have passed since the signal or since
        the newest save began, whichever is later (False): a save is never cut off halfway."""
        assert self.proc is not None
        start = time.monotonic()
        while True:
            end = max(start, self._save_started) + grace_s
            try:
                self.proc.wait(max(0.0, min(end - time.monotonic(), 1.0)))
                return True
            except subprocess.TimeoutExpired:
                if time.monotonic() >= max(start, self._save_started) + grace_s:
                    return False


    def request(self, command: str) -> bool:
        """Ask the running child for a checkpoint ("save") or previews ("sample") at its next
        step, by signal (POSIX); False when there is no running child or no such signal."""
        name = ev.COMMAND_SIGNALS[command]
        with self._lock:
            if self.proc is None or self._signalled or not self.running() \
                    or not hasattr(signal, name):
                return False
            self.proc.send_signal(getattr(signal, name))
        return True


def _parse(line: str) -> ev.Event | None:
    if not line.startswith("{"):
        return None
    try:
        return ev.event_from_json(line)
    except (ValueError, KeyError, TypeError):
        return None


def _interrupt(proc: subprocess.Popen) -> None:
    if os.name == "nt":  # no SIGINT for a child on Windows: terminate is the clean stop there
        proc.terminate()
    else:
        proc.send_signal(signal.SIGINT)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM) if os.name != "nt" else proc.terminate()


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()


class RunManager:
    """One training run at a time for a host: frees the host's GPU, starts the child, tells
    the host about the new checkpoint when it ends. The tab and the API share one manager."""

    def __init__(self, host: Host, cancel_grace_s: float = 30.0) -> None:
        self.host, self.cancel_grace_s = host, cancel_grace_s
        self.run: TrainingRun | None = None
        self.history: list[Progress] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.refreshed = threading.Event()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, config: TrainingConfig) -> TrainingRun:
        """Start training `config` (already validated by the caller) in the background."""
        with self._lock:
            if self.busy():
                raise RuntimeError("A training run is already in progress; cancel it or wait.")
            stamp = time.strftime("%Y%m%d-%H%M%S")
            run_dir = Path(config.work_dir) / config.model_name / "runs" / stamp
            run = TrainingRun(config, _unique(run_dir), self.host.python,
                              self.host.child_pythonpath())
            self.run, self.refreshed = run, threading.Event()
            self._thread = threading.Thread(target=self._supervise, args=(run,),
                                            name="dreambooth-run", daemon=True)
            self._thread.start()
            return run

    def _supervise(self, run: TrainingRun) -> None:
        try:
            claim_model_dir(run.run_dir.parent.parent)  # the run folder goes into the model's
            with self.host.model_offloaded():
                run.start()
                run.wait()
                # still under the host's GPU lock: a queued txt2img never sees the checkpoint
                # list while the host re-reads it (the WebUI empties it first)
                self._refresh(run)
        except Exception as e:  # the host's offload failed, or the child could not start
            with run._lock:
                run.progress.state = "failed"
                run.progress.error = "Training could not start: " + (
                    e.message if isinstance(e, DreamboothError) else f"{type(e).__name__}: {e}")
                run.progress.hint = getattr(e, "hint", "")
            self.host.log(run.progress.error)
        finally:
            self._after(run)

    def _refresh(self, run: TrainingRun) -> None:
        snap = run.snapshot()
        if snap.saved:
            try:
                self.host.refresh_checkpoints()
                if any(is_under(p, self.host.paths.lora_dir) for p in snap.saved):
                    self.host.refresh_loras()
                if any(is_under(p, self.host.paths.embeddings_dir) for p in snap.saved):
                    self.host.refresh_embeddings()
            except Exception as e:  # the file is written; only the list is stale
                self.host.log(f"could not refresh the checkpoint list: {e}")

    def _after(self, run: TrainingRun) -> None:
        snap = run.snapshot()
        self.history.append(snap)
        self.refreshed.set()

    def status(self) -> Progress:
        return self.run.snapshot() if self.run is not None else Progress()

    def request(self, command: str) -> bool:
        """Save now / sample now in the running job (see TrainingRun.request)."""
        run = self.run
        return run is not None and self.busy() and run.request(command)

    def cancel(self) -> bool:
        run = self.run
        if run is None or not self.busy():
            return False
        threading.Thread(target=run.cancel, args=(self.cancel_grace_s,), daemon=True).start()
        return True

    def wait(self, timeout: float | None = None) -> Progress:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()


# One manager per host for the life of the process: the WebUI's "Reload UI" runs the glue
# again, and a run in progress must stay reachable from the new tab.
MANAGERS: dict[str, RunManager] = {}


def _unique(path: Path) -> Path:
    """`path`, or `path`-1, -2... when taken; DreamboothError, in words, when the file system
    can't even look there (a name or path longer than it takes: ENAMETOOLONG)."""
    candidate, i = path, 1
    try:
        while candidate.exists():
            candidate, i = path.with_name(f"{path.name}-{i}"), i + 1
    except (OSError, ValueError) as e:
        raise DreamboothError(f"The run folder '{path}' can't be made "
                              f"({getattr(e, 'strerror', None) or e}).", "Choose a shorter "
                              "work_dir or model_name, in a folder you can write to.") from None
    return candidate


def is_under(path: str, folder: Path) -> bool:
    """True when `path` lies inside `folder` (both resolved)."""
    try:
        Path(path).resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def progress_json(p: Progress) -> str:
    return json.dumps(p.to_dict())
