"""The cloud training job: run tracking (read back with TensorBoard's own reader), a training
service's job contract, outputs and inputs at object-storage URLs (a real S3 protocol server,
moto's, on 127.0.0.1). One tiny trained run serves most tests."""
from __future__ import annotations

import pytest

from dreambooth.config import events as ev

tb_reader = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="tensorboard is not installed (pip install -e .[test] installs it)")


class StopAt:
    """Stops the run at once (as a second Ctrl-C would) after step `at`: nothing saved there."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, event) -> None:
        if isinstance(event, ev.Step) and event.step == self.at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_source, instance_dir):
    """A 4-step run logged to TensorBoard, stopped at once after step 3 (its snapshot: step 2),
    then resumed to the end. -> (config, events of each run, warnings said)."""
    from dreambooth import Concept, TrainingConfig, train
    from dreambooth.host.tracking import Tracking
    root = tmp_path_factory.mktemp("tracked")
    config = TrainingConfig(
        model_name="cloudy", source_checkpoint=str(tiny_source), work_dir=str(root / "runs"),
        output_dir=str(root / "out"), resolution=64, center_crop=True, steps_per_image=1,
        learning_rate=1e-4, concepts=(Concept(str(instance_dir), "photo of sks pattern"),),
        sample_steps=2, sample_every_epochs=1, state_every_steps=2, log_every_steps=1,
        cpu_threads=1, log_with="tensorboard")
    said, runs = [], ([], [])
    with pytest.raises(KeyboardInterrupt):
        tracking = Tracking(config, said.append)
        train(config, lambda e: (runs[0].append(e), tracking(e), StopAt(3)(e)))
    tracking(ev.Stopped(3, "stopped at once"))  # what the CLI says when it catches the stop
    tracking = Tracking(config, said.append)
    result = train(config, lambda e: (runs[1].append(e), tracking(e)))
    assert result.steps == 4 and result.path.is_file()
    return config, runs, said, result


@pytest.mark.once
def test_tensorboard_holds_every_step_once_across_a_resume(tracked):
    config, runs, said, _ = tracked
    started = [e for e in runs[1] if isinstance(e, ev.Started)]
    assert started[0].resumed_from_step == 2  # the stopped run's step 3 is logged twice...
    assert [e.step for e in runs[0] if isinstance(e, ev.Step)] == [1, 2, 3]
    folder = config.model_dir / "tracking" / config.model_name
    acc = tb_reader.EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "steps_per_s"} <= set(tags["scalars"])
    for tag in ("loss", "lr", "steps_per_s"):
        assert [s.step for s in acc.Scalars(tag)] == [1, 2, 3, 4], tag  # ...read back once
    losses = {e.step: e.loss for run in runs for e in run if isinstance(e, ev.Step)}
    resumed = {e.step: e.loss for e in runs[1] if isinstance(e, ev.Step)}
    losses.update(resumed)  # step 3 as the resumed run computed it
    assert [s.value for s in acc.Scalars("loss")] == pytest.approx([losses[s] for s in (1, 2, 3, 4)])
    assert acc.Scalars("lr")[0].value == pytest.approx(1e-4)
    (image,) = acc.Images("samples/0")  # the preview of the sample step
    assert image.step == 4 and (image.width, image.height) == (64, 64)
    assert not [s for s in said if s.startswith("warning")], said


@pytest.mark.once
def test_a_tracker_that_fails_to_start_is_a_warning(tiny_source, instance_dir):
    from dreambooth import Concept, TrainingConfig
    from dreambooth.host.tracking import Tracking

    class Broken:
        def __init__(self, run_name, **kwargs):
            raise ImportError("no module named 'broken'")
    config = TrainingConfig(concepts=(Concept(str(instance_dir), "x"),), log_with="wandb")
    said = []
    tracking = Tracking(config, said.append, classes=lambda: {"wandb": Broken})
    tracking(ev.Started("m", 4, 4, 1, 0))
    tracking(ev.Step(1, 4, 1, 0.5, 1e-4, 1.0))  # no tracker: nothing to do, nothing raised
    assert said == ["warning: run tracking with wandb could not start (ImportError: no module "
                    "named 'broken'); the training goes on without it. Install it with "
                    "`pip install wandb`."]
