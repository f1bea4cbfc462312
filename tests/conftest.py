"""Shared fixtures: tiny models built from configs (seconds on a CPU), synthetic images, no network."""
from __future__ import annotations

import os
import socket

# what the CLI gives a deterministic run (host/cli.py run_training), for the in-process runs too:
# set before torch's first BLAS call
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# gradio's import starts a thread that fetches its messages and version from api.gradio.app
# unless this is off: imported inside a test, that would fail the test's no-network check
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest

from dreambooth.model.tiny import make_tiny_checkpoint, write_images


def pytest_collection_finish(session):
    """The libraries every test module imported, and the training stack, are loaded by now:
    move them out of the cyclic collector's sight, so each collection during a test and the one
    at the end of every in-process run scans only that test's objects (0.27 s a run, ~400k
    objects, before)."""
    import gc
    import sys
    if "torch" in sys.modules:  # never load torch here: the WebUI lanes test that the tab doesn't
        try:
            import dreambooth.training.trainer  # noqa: F401
        except ImportError:
            pass
    gc.collect()
    gc.freeze()


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection in this process fails loudly."""
    def refuse(*args, **kwargs):
        raise NetworkBlocked(f"network access attempted: {args[:2]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield


LOOPBACK = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "", None}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test, in its own process: a connection or name lookup beyond this machine is
    refused and fails the test, even where the code under test swallows the error (a hostile
    file once made diffusers ask a model hub for a repository named '5'). The tests' own
    servers on 127.0.0.1 stay reachable; child processes are not covered."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def local(address) -> bool:
        host = address[0] if isinstance(address, tuple) else None
        return not isinstance(address, tuple) or host in LOOPBACK or \
            str(host).startswith("127.")

    def checked(real):
        def call(self, address, *args):
            if self.family == getattr(socket, "AF_UNIX", None) or local(address):
                return real(self, address, *args)
            attempts.append(address)
            raise NetworkBlocked(f"network access attempted: {address}")
        return call

    def getaddrinfo(host, *args, **kwargs):
        if local((host,)):
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(host)
        raise NetworkBlocked(f"name lookup attempted: {host}")
    monkeypatch.setattr(socket.socket, "connect", checked(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", checked(real_connect_ex))
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    assert not attempts, f"the test tried to reach the network: {attempts}"


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """`tiny_checkpoints(model_type)`: a tiny randomly initialised single-file checkpoint of that
    type, built once per session and shared by every test that asks (read it, never change it:
    a test that changes a source copies it first)."""
    folder, built = tmp_path_factory.mktemp("tiny_sources"), {}

    def get(model_type: str = "v1x"):
        if model_type not in built:
            built[model_type] = make_tiny_checkpoint(
                folder / f"tiny_{model_type}.safetensors", model_type)
        return built[model_type]
    return get


@pytest.fixture(scope="session")
def tiny_source(tiny_checkpoints):
    """A tiny randomly initialised SD1.x-shaped single-file checkpoint."""
    return tiny_checkpoints("v1x")


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instance")
    write_images(folder, "checker", 4)
    return folder


@pytest.fixture
def quick_config(tiny_source, instance_dir, tmp_path):
    """A config that trains the tiny model for a few steps into tmp_path."""
    from dreambooth import Concept, TrainingConfig
    return TrainingConfig(
        model_name="quick", source_checkpoint=str(tiny_source), work_dir=str(tmp_path / "runs"),
        output_dir=str(tmp_path / "out"), resolution=64, center_crop=True, steps_per_image=2,
        learning_rate=1e-4, concepts=(Concept(str(instance_dir), "photo of sks pattern"),),
        class_generation_steps=2, sample_steps=2)
