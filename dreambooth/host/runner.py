"""Training in a child process: `python -m dreambooth train --config run.json --events-jsonl -`.

The child runs with the host's interpreter and our lib folder first on its path, so the host
process never imports torch or diffusers; all GPU memory is returned when it exits; a crash in
training can't take the host down. Its JSON-line events become a `Progress` snapshot (runstate.py).

Commands reach the child as signals (signals.py), only once it said Ready: one asked before is
held until then. Cancel is one SIGINT: the child stops at the end of the step that is running
(its Stopping event), saves a checkpoint and a resume state, and ends. The grace period counts
from that stop point and from the end of each save after it, never during a save; a child that
has not ended when it runs out is stopped at once (SIGQUIT, then a kill): a forced stop, said as
such with what was kept. "Stop now" is the user's own stop at once. Standard library only.
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
from pathlib import Path
from typing import Callable

from ..config import TrainingConfig
from ..config import events as ev
from ..config.errors import DreamboothError
from ..config.folders import claim_model_dir
from .interface import Host
from .runstate import MAX_LOSSES, Progress, apply_event  # noqa: F401 (their home until now)
from .signals import COMMAND_SIGNALS, STOP_NOW

MAX_LOG_LINES = 200


class TrainingRun:
    """One child training process, the thread that reads its events, and a cancel's course."""

    def __init__(self, config: TrainingConfig, run_dir: Path, python: str = sys.executable,
                 pythonpath: list[str] | None = None) -> None:
        self.config, self.run_dir = config, Path(run_dir).resolve()
        self.python, self.pythonpath = python, list(pythonpath or [])
        self.progress = Progress("starting", model_name=config.model_name, run_dir=str(run_dir))
        self.log_lines: list[str] = []
        self._lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._ready = False  # the child said Ready: its handlers take signals
        self._ended = False  # it said Finished, Failed or Stopped: it exits on its own
        self._queued: list[str] = []  # commands asked before it was ready
        self._grace: float | None = None  # set by cancel(), even before the start
        self._now = False  # "Stop now": at once, without saving
        self._forced = False  # stopped by us, not by the user's word
        self._stopper: threading.Thread | None = None
        self._sent: dict[str, float] = {}  # stop | now | kill -> when (monotonic)
        self._times: dict[str, float] = {}  # asked | stop (its stop point) | saved -> when

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
        with self._lock:
            if self._grace is not None:  # cancelled before it began: nothing to start
                self.progress.state = "cancelled"
                return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "run.json").write_text(self.config.to_json(), encoding="utf-8")
        self._stderr = open(self.run_dir / "train.log", "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=self.child_env(),
                                     text=True, encoding="utf-8",
                                     errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._read, name="dreambooth-events", daemon=True)
        self._reader.start()
        with self._lock:
            self._start_stopper()  # a cancel that came before the start
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
                        continue
                    apply_event(self.progress, event)
                    self._note(event)
                try:  # as it comes: the record of a run still going, or of one killed
                    record.write(line + "\n")
                    record.flush()
                except OSError:  # a full disk: the progress above still shows it
                    pass
        code = self.proc.wait()
        self._stderr.close()
        with self._lock:
            self._finish(code)

    def _note(self, event: ev.Event) -> None:
        """What a cancel's course needs from the stream (under the lock)."""
        now = time.monotonic()
        if isinstance(event, ev.Ready):
            self._ready = True
            for command in self._queued:
                self._command(command)
            self._queued = []
        elif isinstance(event, ev.Stopping):
            self._times["stop"] = now
        elif isinstance(event, (ev.CheckpointSaved, ev.StateSaved)):
            self._times["saved"] = now
        elif isinstance(event, (ev.Finished, ev.Failed, ev.Stopped)):
            self._ended = True
            self._times.setdefault("stop", now)

    def _finish(self, code: int) -> None:
        p = self.progress
        p.returncode = code
        if p.state in ("starting", "running", "cancelling"):
            if self._sent.keys() & {"now", "kill"}:  # no word from it after the stop at once
                p.state, p.stop = "stopped", "at_once"
            elif p.state == "cancelling":
                p.state = "cancelled"
            else:
                p.state = "failed"
                p.error = p.error or f"The training process ended with exit code {code}."
                p.hint = p.hint or "See the log below (or train.log in the run folder)."
        if self._forced:
            p.stop = "forced"
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

    # -- commands and cancel ------------------------------------------------------------------
    def request(self, command: str) -> str:
        """Ask the child for a checkpoint ("save") or previews ("sample") at its next step:
        'sent'; 'queued' (it is still starting: sent when it is ready); 'ending' (it stops or
        has stopped: nothing more reaches it); 'unsupported' (no such signal here)."""
        if not hasattr(signal, COMMAND_SIGNALS[command]):
            return "unsupported"
        with self._lock:
            if self._ended or self._grace is not None or self.progress.state not in (
                    "starting", "running") or (self.proc is not None and not self.running()):
                return "ending"
            if not self._ready:
                self._queued += [] if command in self._queued else [command]
                return "queued"
            self._command(command)
        return "sent"

    def _command(self, command: str) -> None:
        if self.running():
            self.proc.send_signal(getattr(signal, COMMAND_SIGNALS[command]))

    def cancel(self, grace_s: float = 30.0, now: bool = False) -> None:
        """Stop the run: cleanly (it saves; see the module's words), or `now` without saving.
        Returns at once; the course runs in a thread of its own."""
        with self._lock:
            if self._grace is None:
                self._grace, self._times["asked"] = float(grace_s), time.monotonic()
            self._now = self._now or now
            self._queued = []
            if self.progress.active:
                self.progress.state = "cancelling"
            self._start_stopper()

    def _start_stopper(self) -> None:
        if self._grace is not None and self.proc is not None and self._stopper is None:
            self._stopper = threading.Thread(target=self._stop, name="dreambooth-cancel",
                                             daemon=True)
            self._stopper.start()

    def _stop(self) -> None:
        """A cancel's course: each signal when it is due, until the child has ended."""
        assert self.proc is not None
        while True:
            try:
                self.proc.wait(0.2)
                return
            except subprocess.TimeoutExpired:
                pass
            with self._lock:
                step = self._due(time.monotonic())
                if step is not None and self.running():
                    self._sent[step] = time.monotonic()
                    _SIGNALS[step](self.proc)

    def _due(self, t: float) -> str | None:
        """The next signal of the course, if one is due at `t` (under the lock)."""
        grace, sent, times = self._grace or 0.0, self._sent, self._times
        if "kill" in sent:
            return None
        if "now" in sent:  # stopping at once: a kill if even that hangs
            return "kill" if t >= sent["now"] + grace else None
        if self._now:  # the user's Stop now; before Ready nothing was trained
            return "now" if self._ready else "kill"
        if not self._ready:  # it takes no signal yet; a start that hangs is stopped hard
            if t < times["asked"] + grace:
                return None
            return self._force(f"it had not begun to train {grace:g} s after Cancel.", "kill")
        if "stop" not in sent and not self._ended:
            return "stop"
        if "stop" not in times or self.progress.saving:  # its step runs, or a save does
            return None
        if t < max(times["stop"], times.get("saved", 0.0)) + grace:
            return None
        return self._force(f"the training process had not ended {grace:g} s after it stopped"
                           " (and after its last save), so it was stopped at once.", "now")

    def _force(self, why: str, step: str) -> str:
        self._forced, self.progress.stop_note = True, why
        return step


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


def _stop_now(proc: subprocess.Popen) -> None:
    if os.name == "nt":
        proc.terminate()
    else:
        proc.send_signal(getattr(signal, STOP_NOW))


_SIGNALS = {"stop": _interrupt, "now": _stop_now, "kill": subprocess.Popen.kill}

class RunManager:
    """One training run at a time for a host: frees the host's GPU, starts the child, tells
    the host about the new checkpoint when it ends. The tab and the API share one manager."""

    def __init__(self, host: Host, cancel_grace_s: float | Callable[[], float] = 30.0) -> None:
        """cancel_grace_s: seconds, or what reads them when Cancel is pressed (a setting)."""
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

    def request(self, command: str) -> str:
        """Save now / sample now in the job: TrainingRun.request's answer, or 'idle'."""
        run = self.run
        return run.request(command) if run is not None and self.busy() else "idle"

    def grace(self) -> float:
        grace = self.cancel_grace_s() if callable(self.cancel_grace_s) else self.cancel_grace_s
        return max(float(grace), 0.0)

    def cancel(self, now: bool = False) -> bool:
        """Cancel the job (it saves), or with `now` stop it at once without saving."""
        run = self.run
        if run is None or not self.busy():
            return False
        run.cancel(self.grace(), now=now)
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
