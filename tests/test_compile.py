"""compile blocks|full: the same training as eager on the tiny model (within float tolerance),
the weights keep their names, and a machine that can't compile is told before training.

The graph is captured by TorchDynamo for real; the test uses the aot_eager backend (no C++
code generation: seconds on a 2-core CPU instead of minutes), which runs the same captured
forward and backward graphs that inductor would turn into kernels."""
from __future__ import annotations

import pytest
import torch

from dreambooth.config.errors import DreamboothError
from dreambooth.training import backends
from dreambooth.training import trainer as trainer_module
from dreambooth.training.trainer import Trainer
from test_memory_levers import run, unet_weights


@pytest.mark.slow
@pytest.mark.once  # torch is the same in both core venvs
@pytest.mark.parametrize("choice", ["blocks", "full"])
def test_compiled_training_matches_eager(choice, quick_config, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    base = quick_config.replace(max_grad_norm=0.0, memory_preset="off", steps_per_image=1,
                                sample_every_epochs=0)
    eager = run(base.replace(model_name="eager"))
    compiled = run(base.replace(model_name=f"compiled_{choice}", compile=choice))
    said = [m for m in compiled.messages if m.startswith("Compiling the UNet")]
    assert said and choice in said[0] and "aot_eager" in said[0]
    if choice == "full":
        assert compiled.comp.unet._compiled_call_impl is not None
    else:
        blocks = [m for m in compiled.comp.unet.modules()
                  if type(m).__name__ in backends.COMPILED_BLOCKS]
        assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    a, b = unet_weights(eager.result.path), unet_weights(compiled.result.path)
    assert a.keys() == b.keys()  # in place: no "_orig_mod." in a saved name
    source = unet_weights(quick_config.source_checkpoint)
    assert any(not torch.equal(b[k], source[k].float()) for k in b)  # it did train
    # the captured graph may fuse or reorder float ops: Adam turns a rounding-level gradient
    # difference into a step of up to about lr, so no weight drifts further than that
    bound = 2 * base.learning_rate * eager.result.steps
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max().item() <= bound, (diffs.max().item(), bound)
    torch._dynamo.reset()


def test_a_machine_without_a_compiler_is_told_before_training(quick_config, monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_COMPILE_BACKEND", "inductor")
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(DreamboothError) as err:
        backends.refuse_uncompilable("blocks", torch.device("cpu"))
    assert "C++ compiler" in err.value.message and "compile to off" in err.value.hint
    backends.refuse_uncompilable("off", torch.device("cpu"))  # nothing to check
    monkeypatch.setenv("DREAMBOOTH_COMPILE_BACKEND", "aot_eager")
    backends.refuse_uncompilable("full", torch.device("cpu"))  # needs no compiler
    monkeypatch.setenv("DREAMBOOTH_COMPILE_BACKEND", "inductor")
    steps = []
    monkeypatch.setattr(Trainer, "micro_step", lambda *a, **k: steps.append(1) or 0.0)
    with pytest.raises(DreamboothError):
        trainer_module.train(quick_config.replace(model_name="nocc", compile="full"))
    assert not steps  # refused before the first step


class ResnetBlock2D(torch.nn.Linear):  # named as diffusers' block: compile 'blocks' takes it
    pass


def test_compiling_blocks_lets_every_block_shape_compile(monkeypatch):
    """Every block shape is one more compile of the block class's one forward: past dynamo's
    recompile limit (8) the rest would run eager, silently (the tiny UNet's ResNet blocks
    passed it; measured in the README). Compiling blocks raises the limit to cover them."""
    import torch._dynamo.config as config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(config, name, 8)
    monkeypatch.setenv("DREAMBOOTH_COMPILE_BACKEND", "aot_eager")
    unet = torch.nn.Sequential(*(ResnetBlock2D(n + 1, n + 2) for n in range(12)))
    backends.compile_unet(unet, "blocks", torch.device("cpu"), lambda text: None)
    assert getattr(config, name) >= 2 * 12
    assert all(m._compiled_call_impl is not None for m in unet)  # compiled at the first call
