"""The cloud training job: run tracking (read back with TensorBoard's own reader), a training
service's job contract, outputs and inputs at object-storage URLs (a real S3 protocol server,
moto's, on 127.0.0.1). One tiny trained run serves most tests."""
from __future__ import annotations

import dataclasses

import pytest

from dreambooth.config import events as ev


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
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e "
                        ".[test] installs it)")
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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    folder = config.model_dir / "tracking" / config.model_name
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "steps_per_s"} <= set(tags["scalars"])
    for tag in ("loss", "lr", "steps_per_s"):
        assert [s.step for s in acc.Scalars(tag)] == [1, 2, 3, 4], tag  # ...read back once
    losses = {e.step: e.loss for run in runs for e in run if isinstance(e, ev.Step)}
    resumed = {e.step: e.loss for e in runs[1] if isinstance(e, ev.Step)}
    losses.update(resumed)  # step 3 as the resumed run computed it
    assert [s.value for s in acc.Scalars("loss")] == \
        pytest.approx([losses[s] for s in (1, 2, 3, 4)])
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


# -- a training service's job contract ----------------------------------------------------------
def _job_env(monkeypatch, tmp_path, tiny_source, instance_dir) -> dict:
    model = tmp_path / "channel_model"
    model.mkdir()
    (model / "base.safetensors").symlink_to(tiny_source)
    env = {"SM_CHANNEL_INSTANCE": str(instance_dir), "SM_CHANNEL_MODEL": str(model),
           "SM_MODEL_DIR": str(tmp_path / "model"), "SM_OUTPUT_DATA_DIR": str(tmp_path / "data")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


HYPERPARAMETERS = {  # as the service writes them: every value a string
    "model_name": "job", "instance_prompt": "\"photo of sks pattern\"", "resolution": "64",
    "center_crop": "True", "steps_per_image": "1", "learning_rate": "1e-4",
    "state_every_steps": "0", "cpu_threads": "1", "save_precision": "fp16"}


def test_a_job_of_string_hyperparameters_and_channels_trains_end_to_end(
        tmp_path, monkeypatch, capsys, tiny_source, instance_dir):
    import json

    from dreambooth.host.cli import main
    from dreambooth.model.checkpoint import read_checkpoint
    env = _job_env(monkeypatch, tmp_path, tiny_source, instance_dir)
    hp = tmp_path / "hyperparameters.json"
    hp.write_text(json.dumps({**HYPERPARAMETERS, "work_dir": str(tmp_path / "runs")}))
    assert main(["train", "--config", str(hp)]) == 0
    out = capsys.readouterr()
    written = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert written == ["job_4.safetensors", "job_4.yaml"], (written, out.err)
    assert out.out.strip().splitlines()[-1] == str(tmp_path / "model" / "job_4.safetensors")
    _, meta = read_checkpoint(tmp_path / "model" / "job_4.safetensors")
    saved = json.loads(meta["dreambooth.config"])
    assert (saved["resolution"], saved["center_crop"], saved["learning_rate"]) == (64, True, 1e-4)
    assert saved["concepts"] == [{**saved["concepts"][0], "instance_prompt": "photo of sks pattern",
                                  "instance_data_dir": env["SM_CHANNEL_INSTANCE"]}]
    assert saved["source_checkpoint"].endswith("channel_model/base.safetensors")
    assert "step 4/4 (100%)" in out.err  # progress as lines: the job's log is not a terminal


@pytest.mark.once
def test_a_job_value_that_does_not_convert_is_named_in_the_usual_words(
        tmp_path, monkeypatch, capsys, tiny_source, instance_dir):
    import json

    from dreambooth.host.cli import main
    _job_env(monkeypatch, tmp_path, tiny_source, instance_dir)
    hp = tmp_path / "hyperparameters.json"
    hp.write_text(json.dumps({**HYPERPARAMETERS, "steps_per_image": "many",
                              "center_crop": "maybe"}))
    assert main(["train", "--config", str(hp)]) == 2
    err = capsys.readouterr().err
    assert "steps_per_image = 'many': should be a whole number" in err
    assert "center_crop = 'maybe': should be true or false" in err


@pytest.mark.once
def test_a_container_without_the_variables_finds_the_channels_by_the_service_layout(
        tmp_path, capsys, tiny_source, instance_dir, monkeypatch):
    import json
    import shutil

    from dreambooth.host.cli import main
    for k in [k for k in __import__("os").environ if k.startswith("SM_")]:
        monkeypatch.delenv(k)
    ml = tmp_path / "opt" / "ml"
    (ml / "input" / "config").mkdir(parents=True)
    shutil.copytree(instance_dir, ml / "input" / "data" / "instance")
    (ml / "input" / "data" / "model").mkdir()
    (ml / "input" / "data" / "model" / "sd.safetensors").symlink_to(tiny_source)
    hp = ml / "input" / "config" / "hyperparameters.json"
    hp.write_text(json.dumps({**HYPERPARAMETERS, "log_with": "tensorboard"}))
    assert main(["train", "--config", str(hp), "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["concepts"][0]["instance_data_dir"] == str(ml / "input" / "data" / "instance")
    assert config["source_checkpoint"] == str(ml / "input" / "data" / "model" / "sd.safetensors")
    assert config["output_dir"] == config["lora_dir"] == str(ml / "model")
    assert config["logging_dir"] == str(ml / "output" / "data" / "tracking")
    assert (config["steps_per_image"], config["learning_rate"]) == (1, 1e-4)


@pytest.mark.once
def test_the_core_imports_no_cloud_package_unless_asked():
    """The CLI, the job contract, the tracker and the uploader import fsspec, s3fs, boto,
    tensorboard, wandb, mlflow only once a URL or a tracker is asked for."""
    import subprocess
    import sys
    code = ("import sys, dreambooth, dreambooth.host.cli, dreambooth.config.job, "
            "dreambooth.host.tracking, dreambooth.host.storage, dreambooth.host.urls\n"
            "bad = ('fsspec', 's3fs', 'boto3', 'botocore', 'aiobotocore', 'tensorboard', "
            "'tensorboardX', 'wandb', 'mlflow', 'moto', 'accelerate', 'torch')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr)


# -- folders at object-storage URLs, against moto's S3 server on 127.0.0.1 ------------------------
FAKE_KEY, FAKE_SECRET = "AKIAFAKE0LEAK0CHECK1", "fAkE+sEcReT/LeakCheck0123456789abcdefXYZ"


class S3Server:
    """moto's S3 server in this process (its buckets outlive a stop and a restart)."""

    def __init__(self) -> None:
        import socket
        from moto.server import ThreadedMotoServer
        self.make = ThreadedMotoServer
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        self.server = self.make(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def auth(self, on: bool) -> None:
        """moto checks keys and policies (on) or takes any request (off)."""
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(
            self.endpoint + "/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
            headers={"Content-Type": "text/plain"}), timeout=30).read()


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="moto is not installed (pip install -e .[test])")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e .[test])")
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Fake credentials in the standard environment chain, the server as the endpoint; a boto3
    client to arrange buckets with."""
    import boto3
    import s3fs
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(k, raising=False)
    env = {"AWS_ACCESS_KEY_ID": FAKE_KEY, "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server.endpoint,
           "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # each test's credentials, not an earlier one's
    if s3_server.server is None:
        s3_server.start()
    yield boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()


def _sha(path) -> str:
    import hashlib
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _leaks(root) -> list[str]:
    from pathlib import Path
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and any(
        s.encode() in p.read_bytes() for s in (FAKE_KEY, FAKE_SECRET))]


def test_outputs_at_a_url_a_missing_bucket_then_the_upload_command(
        s3, tmp_path, capsys, quick_config):
    """The run writes locally, fails to upload to a bucket that does not exist (one sentence,
    the retry command, the local file untouched), then `upload` sends it and verifies it; no
    file we wrote and no line we said holds the credentials."""
    from dreambooth.host.cli import main
    s3.create_bucket(Bucket="classes")  # empty: the run generates its class images, sends them
    concept = dataclasses.replace(quick_config.concepts[0], class_prompt="photo of a pattern",
                                  class_data_dir="s3://classes/pattern",
                                  class_images_per_instance=1)
    cfg = quick_config.replace(model_name="up", steps_per_image=1, state_every_steps=0,
                               cpu_threads=1, output_dir="s3://outputs/models",
                               log_with="tensorboard", sample_every_epochs=1,
                               concepts=(concept,))
    (tmp_path / "run.json").write_text(cfg.to_json())
    events = tmp_path / "events.jsonl"
    assert main(["train", "--config", str(tmp_path / "run.json"), "--events-jsonl",
                 str(events)]) == 1
    said = capsys.readouterr()
    local = cfg.model_dir / "outbox" / "output_dir" / "up_4.safetensors"
    assert said.out.strip() == str(local) and local.is_file()
    assert f"{local} did not reach s3://outputs/models/up_4.safetensors (the bucket does not " \
           "exist)" in said.err
    assert f"fix: python -m dreambooth upload {cfg.model_dir}" in said.err
    classes = [o["Key"] for o in s3.list_objects_v2(Bucket="classes")["Contents"]]
    assert len(classes) == 4 and all(k.startswith("pattern/") for k in classes), classes
    assert "s3://classes/pattern: 4 generated class image(s) uploaded (verified)" in said.err
    before = (_sha(local), local.stat().st_mtime_ns)
    s3.create_bucket(Bucket="outputs")
    assert main(["upload", str(cfg.model_dir)]) == 0
    again = capsys.readouterr()
    assert "uploaded: s3://outputs/models/up_4.safetensors (verified)" in again.err
    assert "uploaded: s3://outputs/models/up_4.yaml (verified)" in again.err
    body = s3.get_object(Bucket="outputs", Key="models/up_4.safetensors")["Body"].read()
    assert __import__("hashlib").sha256(body).hexdigest() == before[0]
    assert (_sha(local), local.stat().st_mtime_ns) == before  # never touched
    assert main(["upload", str(cfg.model_dir)]) == 0  # nothing left to send: says nothing
    assert capsys.readouterr().err == ""
    assert not _leaks(tmp_path), _leaks(tmp_path)
    assert FAKE_KEY not in said.err + again.err and FAKE_SECRET not in said.err + again.err
    assert (cfg.model_dir / "tracking").is_dir() and events.stat().st_size > 0


@pytest.mark.once
def test_every_output_type_goes_to_its_url(s3, tmp_path, quick_config):
    from dreambooth.host.urls import localize
    s3.create_bucket(Bucket="types")
    cfg = quick_config.replace(output_dir="s3://types/ckpt", lora_dir="s3://types/lora/",
                               embedding_dir="s3://types/emb")
    local, uploads = localize(cfg, print)
    for field, name in (("output_dir", "m.safetensors"), ("lora_dir", "m_lora.safetensors"),
                        ("embedding_dir", "m_emb.safetensors")):
        folder = __import__("pathlib").Path(getattr(local, field))
        assert folder == cfg.model_dir / "outbox" / field
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode() * 100)
        uploads(ev.CheckpointSaved(str(folder / name), 1))
    assert uploads.finish() == []
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="types")["Contents"])
    assert keys == ["ckpt/m.safetensors", "emb/m_emb.safetensors", "lora/m_lora.safetensors"]


def test_an_upload_cut_by_the_server_stopping_resumes_after_its_restart(
        s3, s3_server, tmp_path, monkeypatch):
    """A 12 MiB file in 5 MiB parts; the server stops after the first part. The failure is
    recorded, the local file kept; with the server back, `upload` sends the other two parts,
    completes the upload and verifies it."""
    import json
    import os

    from dreambooth.host import storage
    monkeypatch.setattr(storage, "PART", 5 * 2**20)
    s3.create_bucket(Bucket="cut")
    outbox = tmp_path / "m" / "outbox" / "output_dir"
    outbox.mkdir(parents=True)
    big = outbox / "m_9.safetensors"
    big.write_bytes(os.urandom(12 * 2**20))
    before = _sha(big)
    said = []

    def say(text):
        said.append(text)
        if text.startswith("uploading") and s3_server.server is not None:
            s3_server.stop()  # after the first part
    uploads = storage.Uploads(tmp_path / "m", {outbox: "s3://cut/x"}, say)
    uploads(ev.CheckpointSaved(str(big), 9))
    (failure,) = uploads.finish()
    assert failure.startswith(f"{big} did not reach s3://cut/x/m_9.safetensors (")
    assert _sha(big) == before and s3_server.server is None
    s3_server.start()
    __import__("s3fs").S3FileSystem.clear_instance_cache()
    said.clear()
    assert storage.upload_run(str(tmp_path / "m"), said.append) == 0
    # only the parts the store lacks are sent again
    assert said == ["uploaded: s3://cut/x/m_9.safetensors (resumed at part 2 of 3, verified)"]
    entry = json.loads((outbox.parent / "uploads.json").read_text())["files"][str(big)]
    assert entry["state"] == "done" and entry["upload_id"] is None  # completed, not pending
    body = s3.get_object(Bucket="cut", Key="x/m_9.safetensors")["Body"].read()
    assert __import__("hashlib").sha256(body).hexdigest() == before == _sha(big)


@pytest.mark.once
def test_wrong_credentials_and_a_read_only_bucket_are_one_sentence_each(
        s3, s3_server, tmp_path, monkeypatch):
    import json

    import boto3

    from dreambooth.host import storage
    s3.create_bucket(Bucket="guarded")
    iam = boto3.client("iam", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"}]}))
    reader = iam.create_access_key(UserName="reader")["AccessKey"]
    outbox = tmp_path / "m" / "outbox" / "output_dir"
    outbox.mkdir(parents=True)
    (outbox / "m_1.safetensors").write_bytes(b"weights" * 1000)
    before = _sha(outbox / "m_1.safetensors")
    s3_server.auth(True)
    try:
        failures = []
        for key, secret in ((FAKE_KEY, FAKE_SECRET),
                            (reader["AccessKeyId"], reader["SecretAccessKey"])):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            __import__("s3fs").S3FileSystem.clear_instance_cache()
            uploads = storage.Uploads(tmp_path / "m", {outbox: "s3://guarded/x"}, print)
            uploads(ev.CheckpointSaved(str(outbox / "m_1.safetensors"), 1))
            failures += uploads.finish()
    finally:
        s3_server.auth(False)
    where = f"{outbox / 'm_1.safetensors'} did not reach s3://guarded/x/m_1.safetensors"
    assert failures == [f"{where} (access denied or wrong credentials)",  # a HEAD: no code
                        f"{where} (access denied by the bucket's policy)"], failures
    assert _sha(outbox / "m_1.safetensors") == before
    assert "Contents" not in s3.list_objects_v2(Bucket="guarded")


def test_an_input_folder_at_a_url_is_cached_by_identity_and_refetched_when_it_changes(
        s3, tmp_path, quick_config, instance_dir):
    import os

    from dreambooth.config.errors import DreamboothError
    from dreambooth.host.urls import fetch_inputs
    s3.create_bucket(Bucket="inputs")
    names = sorted(p.name for p in instance_dir.iterdir())
    for name in names:
        s3.put_object(Bucket="inputs", Key=f"dog/{name}", Body=(instance_dir / name).read_bytes())
    cfg = quick_config.replace(concepts=(quick_config.concepts[0].__class__(
        "s3://inputs/dog", "photo of sks dog"),))
    said = []
    local = fetch_inputs(cfg, said.append)
    folder = __import__("pathlib").Path(local.concepts[0].instance_data_dir)
    assert sorted(p.name for p in folder.iterdir()) == names
    assert all(_sha(folder / n) == _sha(instance_dir / n) for n in names)
    assert said[-1].startswith(f"s3://inputs/dog: {len(names)} file(s) fetched, 0 reused")
    local.check()  # a config the trainer takes
    fetch_inputs(cfg, said.append)
    assert said[-1].startswith(f"s3://inputs/dog: 0 file(s) fetched, {len(names)} reused")
    s3.put_object(Bucket="inputs", Key=f"dog/{names[0]}",  # changed between two runs
                  Body=(instance_dir / names[1]).read_bytes())
    s3.delete_object(Bucket="inputs", Key=f"dog/{names[2]}")
    fetch_inputs(cfg, said.append)
    assert said[-1].startswith(f"s3://inputs/dog: 1 file(s) fetched, {len(names) - 2} reused")
    assert _sha(folder / names[0]) == _sha(instance_dir / names[1])
    assert not (folder / names[2]).exists()
    # a full disk during a fetch: one sentence, the cache as it was
    s3.put_object(Bucket="inputs", Key="dog/new.png", Body=(instance_dir / names[0]).read_bytes())
    (folder / f".new.png.{os.getpid()}.part").symlink_to("/dev/full")  # writes: ENOSPC
    kept = {n: _sha(folder / n) for n in (names[0], names[1])}
    with pytest.raises(DreamboothError) as e:
        fetch_inputs(cfg, said.append)
    assert e.value.message == (f"Fetching 's3://inputs/dog' into {folder} failed at new.png (No "
                               "space left on device); the files fetched before it are kept.")
    assert e.value.hint.startswith("Free space on that disk")
    assert {n: _sha(folder / n) for n in kept} == kept and not (folder / "new.png").exists()
    with pytest.raises(DreamboothError, match=r"'s3://nobucket/dog' can't be read \(the bucket"):
        fetch_inputs(cfg.replace(concepts=(cfg.concepts[0].__class__("s3://nobucket/dog", "x"),)),
                     said.append)


@pytest.mark.once
def test_class_images_generated_for_a_url_go_back_or_stay_with_a_warning(s3, tmp_path,
                                                                          quick_config):
    """An empty class folder at a URL is fine (its images are generated); what was generated
    into its local copy is uploaded and reused by the next fetch; a store that refuses it leaves
    a warning and the local files."""
    from dreambooth.host.urls import fetch_inputs, send_back
    s3.create_bucket(Bucket="cls")
    s3.create_bucket(Bucket="gone")
    concepts = tuple(dataclasses.replace(quick_config.concepts[0], class_prompt="a pattern",
                                         class_data_dir=url, class_images_per_instance=1)
                     for url in ("s3://cls/p", "s3://gone/p"))
    cfg = quick_config.replace(concepts=concepts)
    said = []
    local = fetch_inputs(cfg, said.append)
    assert said == ["s3://cls/p: 0 file(s) fetched, 0 reused from the cache "
                    f"{local.concepts[0].class_data_dir}", said[1]]
    made = []
    for c in local.concepts:
        folder = __import__("pathlib").Path(c.class_data_dir)
        for name in ("0.png", "1.png"):
            (folder / name).write_bytes(name.encode() * 50)
        (folder / ".2.png.tmp").write_bytes(b"partial")  # a write in progress: not sent
        made.append(folder)
    s3.delete_bucket(Bucket="gone")
    said.clear()
    send_back(cfg, local, said.append)
    assert said == ["s3://cls/p: 2 generated class image(s) uploaded (verified)",
                    "warning: 2 class image(s) generated for 's3://gone/p' did not reach it "
                    f"(the bucket does not exist); they stay in {made[1]}, where the next run "
                    "on this machine finds them."], said
    assert sorted(o["Key"] for o in s3.list_objects_v2(Bucket="cls")["Contents"]) == \
        ["p/0.png", "p/1.png"]
    assert sorted(p.name for p in made[1].iterdir()) == [".2.png.tmp", "0.png", "1.png"]
    said.clear()
    fetch_inputs(cfg.replace(concepts=concepts[:1]), said.append)
    assert said[-1].startswith("s3://cls/p: 0 file(s) fetched, 2 reused")
    said.clear()
    send_back(cfg.replace(concepts=concepts[:1]), local.replace(concepts=local.concepts[:1]),
              said.append)
    assert said == []  # nothing new


@pytest.mark.once
def test_a_source_checkpoint_at_a_url_is_fetched_whole(s3, tmp_path, quick_config, tiny_source):
    from dreambooth.host.urls import fetch_inputs
    s3.create_bucket(Bucket="sources")
    s3.put_object(Bucket="sources", Key="base/sd.safetensors", Body=tiny_source.read_bytes())
    said = []
    local = fetch_inputs(quick_config.replace(source_checkpoint="s3://sources/base/sd.safetensors"),
                         said.append)
    assert local.source_checkpoint.endswith("/sd.safetensors")
    assert _sha(local.source_checkpoint) == _sha(tiny_source)
    assert said == [f"s3://sources/base/sd.safetensors: 1 file(s) fetched, 0 reused from the "
                    f"cache {__import__('pathlib').Path(local.source_checkpoint).parent}"]


@pytest.mark.once
def test_a_url_is_shown_without_its_secrets():
    from dreambooth.config.cloud import is_url, redact
    assert redact("https://user:pw@host/x?X-Amz-Signature=abc&part=1&sig=zz") == \
        "https://***@host/x?X-Amz-Signature=***&part=1&sig=***"
    assert redact("s3://bucket/models") == "s3://bucket/models"
    assert is_url("s3://b/x") and is_url("file:///tmp/x") and not is_url("C:\\models") \
        and not is_url("models/s3://x")
