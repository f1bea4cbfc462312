"""Shared fixtures: tiny models built from configs (seconds on a CPU), synthetic images, no network."""
from __future__ import annotations

import os
import socket

# what the CLI gives a deterministic run (host/cli.py run_training), for the in-process runs too:
# set before torch's first BLAS call
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest

from dreambooth.model.tiny import make_tiny_checkpoint, write_images


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
