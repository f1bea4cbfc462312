"""A save writes the file one tensor at a time: the same file safetensors writes, holding about
one tensor beside the model while it does, never a copy of the whole state."""
from __future__ import annotations

import json
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreambooth.model.checkpoint import cast_for_save, write_safetensors
from dreambooth.model.components import build_random
from dreambooth.model.single_file import ldm_state, save_single_file
from dreambooth.model.streamed import Deferred, write_streamed
from dreambooth.model.tiny import tiny_configs


def _split(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def test_a_streamed_file_is_the_file_safetensors_writes(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"b.weight": torch.randn(3, 4, generator=g), "a": torch.randn(5, generator=g),
             "half": torch.randn(2, 3, generator=g).half(), "empty": torch.zeros(0, 4),
             "brain": torch.randn(4, generator=g).bfloat16(), "ids": torch.arange(7)[None],
             "mask": torch.tensor([True, False]), "wide": torch.randn(2, 3, generator=g).T}
    meta = {"z": "1", "name": "ünïcode \"quoted\""}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "ref.safetensors"),
              metadata=meta)
    fused = state["b.weight"]
    state["b.weight"] = Deferred((3, 4), torch.float32, lambda: fused.clone())
    with open(tmp_path / "ours.safetensors", "wb") as fh:
        write_streamed(fh, state, meta)
    ours, ours_data = _split(tmp_path / "ours.safetensors")
    ref, ref_data = _split(tmp_path / "ref.safetensors")
    assert ours == ref and ours_data == ref_data  # same header, same data bytes (and hash)
    loaded = load_file(str(tmp_path / "ours.safetensors"))
    expected = {**state, "b.weight": fused}
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def _scaled_model():
    """SD1's layout, 40 MB: the tiny model twice as wide with a 1000-word vocabulary, so that
    no tensor holds more than 1/34 of the whole (in SD1.5 the largest holds 1/28)."""
    configs = tiny_configs("v1x")
    configs["text_encoder"]["vocab_size"] = 1000
    configs["unet"]["block_out_channels"] = [64, 64, 128, 128]
    return build_random("v1x", configs, seed=0)


@pytest.fixture(scope="module")
def scaled():
    return _scaled_model()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_single_file_save_writes_what_safetensors_wrote_before(scaled, tmp_path, precision):
    """The file a save wrote before it streamed (cast_for_save, then safetensors' save_file):
    the same tensors under the same names and the same data bytes, so the same hash."""
    path = save_single_file(scaled, tmp_path / "new.safetensors", precision)
    before = cast_for_save(ldm_state(scaled), precision, scaled.spec.buffers)
    save_file(before, str(tmp_path / "before.safetensors"))
    header, data = _split(path)
    ref_header, ref_data = _split(tmp_path / "before.safetensors")
    assert data == ref_data
    assert {k: v for k, v in header.items() if k != "__metadata__"} == ref_header
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
               for k, v in before.items())


def _peak_extra_bytes(call) -> int:
    """The most memory `call` holds at once beyond what it started with: tensors (each
    allocation and free of torch's CPU allocator, as its profiler records them) plus Python
    objects and numpy arrays (tracemalloc). Counts, not timings: the same on any machine."""
    from torch.profiler import ProfilerActivity, profile
    tracemalloc.start()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak + python_peak


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_save_holds_about_one_tensor_beside_the_model(scaled, tmp_path, precision):
    state = ldm_state(scaled)
    whole = sum(v.numel() * 4 for v in state.values())
    largest = max(v.numel() * 4 for v in state.values())
    # one tensor made and one cast; Python's part: the header, the names, and the model the
    # layout check builds on the meta device (about 3.4 MB here, whatever the weights)
    bound = 2 * largest + (4 << 20)
    assert whole // 2 > 2 * bound  # (else a half copy of the whole state would pass too)
    # the measure sees a whole copy: what a half save made before it streamed
    assert _peak_extra_bytes(lambda: cast_for_save(ldm_state(scaled), "fp16")) >= whole // 2
    extra = _peak_extra_bytes(
        lambda: save_single_file(scaled, tmp_path / "m.safetensors", precision))
    assert extra <= bound, f"a save held {extra / 2**20:.2f} MiB beside the model"


def test_the_working_model_is_streamed_too(tmp_path):
    big = {f"w{i}": torch.randn(256, 256) for i in range(32)}  # 8 MiB, 256 KiB each
    extra = _peak_extra_bytes(lambda: write_safetensors(tmp_path / "w.safetensors", big,
                                                        {"format": "pt"}))
    assert extra <= 2 * (256 * 256 * 4) + (1 << 20)
    loaded = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in big.items())


def test_the_ema_weights_are_saved_without_a_copy_of_the_unet():
    """The state a save with use_ema writes: the EMA's weights where the UNet has parameters
    (as copying them into the UNet gave), its buffers, and nothing copied."""
    from diffusers.training_utils import EMAModel

    from dreambooth.training.saver import ema_state
    torch.manual_seed(0)
    unet = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64),
                               torch.nn.Linear(64, 64).to(torch.bfloat16))
    ema = EMAModel(unet.parameters(), decay=0.5)
    ema.shadow_params[-1] = ema.shadow_params[-1].float()  # an EMA kept in another dtype
    live = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        for s in ema.shadow_params:
            s.add_(1.0)
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    expected = {k: v.clone() for k, v in unet.state_dict().items()}
    ema.restore(unet.parameters())
    held = []
    extra = _peak_extra_bytes(lambda: held.append(ema_state(unet, ema)))
    state = {k: v.make() if isinstance(v, Deferred) else v for k, v in held[0].items()}
    assert state.keys() == expected.keys()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in expected.items())
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in live.items())  # UNet untouched
    assert extra < 64 * 64 * 4  # not even one weight copied
