"""The benchmark runs end to end at smoke size (tiny model, CPU): every configuration is listed,
and the CLI runs one configuration per code path of the benchmark, with the start-up time.
No timing is asserted: CPU timings of a tiny model say nothing about a GPU, and on a busy machine
nothing at all. Only what holds at any speed is checked: every number is there and positive, the
derived ones agree with their parts to the rounding of the report, the parts of the startup time
add up, and each run has the settings it promises."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from patience import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATIONS = {"full_bs1", "full_bs8", "text_encoder_bs1", "prior_bs1", "lora_r16_bs1",
                  "sdxl_lora_1024", "sdxl_full_1024"}
RUNS = {"reference", "ours_same", "ours_best", "ours_lowest"}
# One configuration per code path of the benchmark, each run through the CLI (all seven took
# 576 s of a 71-minute suite on a busy 2-core machine): the reference's text-encoder, prior
# (two images a step) and LoRA branches and ours with each, timed in alternating rounds; the
# SDXL reference's full fine-tune, timed alone (the `alone` path). Not run here: full_bs1 is
# prior_bs1 without its class half, full_bs8 the same runs with a batch of 8, and
# sdxl_lora_1024's reference and ours_best step in-process below (SDXL LoRA: its reference's
# layers and conditioning are checked there too; ours on SDXL and ours with LoRA run here).
SMOKED = ("text_encoder_bs1", "prior_bs1", "lora_r16_bs1", "sdxl_full_1024")


def test_the_benchmark_lists_every_configuration_and_skips_none(tmp_path):
    """Every configuration is there and runnable (none skipped), with the batch, text encoder,
    prior, LoRA rank and model type its name promises, and our settings for each are valid."""
    from bench import cases as C
    cases = {c.name: c for c in C.cases()}
    assert set(cases) == CONFIGURATIONS and set(SMOKED) <= CONFIGURATIONS
    assert {n: c.skip for n, c in cases.items() if c.skip} == {}
    assert cases["full_bs8"].batch_size == 8 and cases["full_bs8"].images_per_step == 8
    assert cases["prior_bs1"].prior and cases["prior_bs1"].images_per_step == 2
    assert cases["text_encoder_bs1"].train_text_encoder
    assert cases["lora_r16_bs1"].lora_rank == cases["sdxl_lora_1024"].lora_rank == 16
    assert {n for n, c in cases.items() if c.model_type == "sdxl"} == \
        {"sdxl_lora_1024", "sdxl_full_1024"}
    assert [n for n, c in cases.items() if c.alone] == ["sdxl_full_1024"]
    data = C.Data(("/i/a.png",), ("/c/a.png",), C.TINY)
    for case in cases.values():
        for best, preset in ((False, "off"), (True, "off"), (True, "lowest")):
            cfg = C.our_config(case, data, tmp_path, "bf16", best=best, preset=preset)
            assert cfg.batch_size == case.batch_size and cfg.model_type == case.model_type
            assert bool(cfg.use_lora) == bool(case.lora_rank), case.name
            assert cfg.concepts[0].class_images_per_instance == (1 if case.prior else 0)
            assert cfg.validate(check_paths=False) == [], (case.name, best, preset)


@pytest.mark.slow
@pytest.mark.once
def test_bench_smoke_reports_one_configuration_per_code_path(tmp_path):
    out = tmp_path / "bench.json"
    # one thread: on a shared or busy CI machine, spinning OpenMP threads make steps 10x slower
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # one timed step per run and no warm-up: the report is checked here, not the speed
    proc = run([sys.executable, "-m", "bench", "--smoke", "--steps", "1", "--warmup", "0",
                "--only", ",".join(("startup",) + SMOKED), "--json", str(out)], 200,
               cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["resolution"] == 64
    by_name = {c["name"]: c for c in report["configurations"]}
    assert list(by_name) == list(SMOKED)  # in the benchmark's order, only those asked for
    ran = [c for c in by_name.values() if c["status"] == "ok"]
    assert {c["name"] for c in ran} == set(SMOKED)
    for c in ran:
        assert set(c["runs"]) == RUNS and c["resolution"] == 64
        script = c["runs"]["reference"]["settings"]["script"]
        assert script == {"v1x": "train_dreambooth.py",
                          "sdxl": "train_dreambooth_lora_sdxl.py"}[c["model_type"]]
        for name, r in c["runs"].items():
            assert r["ratio_to_reference"] > 0 and r["steps_per_s"] > 0, (c["name"], name)
            per_step = c["batch_size"] * (2 if c["prior_preservation"] else 1)
            # both are rounded to 4 decimals in the report: that rounding, times the images per
            # step, is all they may differ by, however slow the steps were
            assert r["images_per_s"] == pytest.approx(r["steps_per_s"] * per_step, rel=0,
                                                       abs=0.5e-4 * (per_step + 1) + 1e-12)
            assert r["flops_per_step"] > 0 and r["peak_allocated_gb"] >= 0
        runs = c["runs"]
        assert all(runs[n]["estimate_gb"] > 0 for n in RUNS - {"reference"})  # beside the peak
        assert proc.stdout.count("settings: ") >= len(ran) * len(RUNS)  # each row's settings
        # the reference encodes images with the VAE every step, our best settings never do
        assert runs["ours_best"]["flops_per_step"] < runs["reference"]["flops_per_step"]
        assert runs["ours_best"]["settings"]["latents"] == "cached"
        # AdamW as it runs on a GPU, on this CPU too, and said: foreach / fused
        assert runs["reference"]["settings"]["optimizer"] == "torch.optim.AdamW [foreach]"
        assert runs["ours_best"]["settings"]["optimizer"] == "adamw [fused]"
        assert runs["ours_same"]["settings"]["latents"] == "VAE every step"
        lowest = runs["ours_lowest"]["settings"]
        assert lowest["gradient_checkpointing"] and lowest["mixed_precision"] == "bf16"
        if not c["lora_rank"]:  # the memory preset: Adafactor on bf16 weights, in backward
            assert lowest["fused_optimizer"] and lowest["bf16_weights"]
            assert lowest["optimizer"].startswith("adafactor (bucketed, in backward)")
    assert by_name["prior_bs1"]["prior_preservation"]  # two images a step: checked above
    assert by_name["text_encoder_bs1"]["runs"]["ours_same"]["settings"]["text"] == \
        "text encoder every step"
    assert by_name["lora_r16_bs1"]["runs"]["reference"]["settings"]["lora_rank"] == 16
    check_startup(report["startup"])
    assert "startup            to first step" in proc.stdout


def check_startup(s: dict) -> None:
    """The time from 'Train' to the first step, from a single-file checkpoint and 10 images."""
    assert s["images"] == 10 and s["checkpoint_mb"] > 0 and s["target_s"] == 20
    for key in ("to_started_s", "to_first_step_s", "first_step_s", "load_s", "cache_s",
                "fresh_process_imports_s"):
        assert s[key] > 0, key
    assert s["to_first_step_s"] >= s["to_started_s"] >= s["load_s"] + s["cache_s"] - 0.002
    assert s["from_train_s"] >= s["to_first_step_s"]
    # the file loaded again in a fresh process: its time and peak memory, beside the bound
    assert s["fresh_load_s"] > 0 and s["load_peak_rss_gb"] > 0 and s["load_rss_bound_gb"] > 0
    assert s["host_startup_s"] > 0
    assert 0 < s["load_as_stored_peak_rss_gb"] <= s["load_peak_rss_gb"] + 0.05  # tiny: noise


def test_every_rows_adamw_takes_the_path_a_gpu_takes_and_says_which():
    """On a CPU torch's AdamW would loop over the weights in Python, which no GPU run does: the
    reference's is set to foreach, ours is built fused (as on a GPU), each says what ran, and
    all three update alike."""
    from types import SimpleNamespace

    from bench.gpu_path import foreach_as_on_cuda, fused_adamw, implementation
    from dreambooth.training import backends
    weights = [[torch.nn.Parameter(torch.linspace(-1, 1, 6))] for _ in range(3)]
    plain, foreach = torch.optim.AdamW(weights[0]), torch.optim.AdamW(weights[1])
    assert implementation(plain) == "for-loop"  # what torch picks for CPU weights
    foreach_as_on_cuda(foreach)
    assert implementation(foreach) == "foreach"
    with fused_adamw():
        fused = backends.OPTIMIZERS["adamw"](
            [{"params": weights[2]}], SimpleNamespace(learning_rate=1e-3, weight_decay=1e-2),
            torch.device("cpu"))
    assert backends.OPTIMIZERS["adamw"] is backends._adamw  # only within
    assert implementation(fused) == "fused"
    for opt, (w,) in zip((plain, foreach, fused), weights):
        w.grad = torch.linspace(1, -1, 6)
        opt.step()
    assert torch.allclose(weights[0][0], weights[1][0]) and \
        torch.allclose(weights[0][0], weights[2][0], atol=1e-6)


def test_moving_the_reference_between_rounds_keeps_adamws_step_counters_in_place():
    """AdamW keeps its `step` counters on the CPU; moved to the GPU with the rest of its state,
    every later step would read them back (one sync per weight), a handicap diffusers' script
    never has. 'meta' stands in for the GPU here."""
    from bench.measure import move
    weight = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([weight], foreach=True)
    weight.grad = torch.ones(3)
    opt.step()
    move(opt, "meta")
    state = opt.state[weight]
    assert state["exp_avg"].device.type == "meta" and state["step"].device.type == "cpu"


def test_moving_a_bucketed_run_moves_its_bf16_scratch_and_it_steps_on():
    """Bucketed's fp32 scratch for bf16 weights goes with the run (else it would stay on the
    GPU through the reference's rounds); the stand-ins keep their identity and a step after
    the move updates the weights as before. 'meta' stands in for the GPU."""
    from bench.measure import move
    from dreambooth.training.optim import Bucketed
    weights = [torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16)) for _ in range(2)]
    opt = Bucketed([{"params": weights, "lr": 0.1}],
                   lambda groups: torch.optim.SGD(groups, lr=0.1), in_backward=False)
    stand_ins = [s for b in opt.buckets for s in b.stand_ins]
    move(opt, "meta")
    assert all(b.device.type == "meta" for b in opt.scratch)
    assert all(s.device.type == "meta" for b in opt.buckets for s in b.stand_ins)
    move(opt, "cpu")
    assert [s for b in opt.buckets for s in b.stand_ins] == stand_ins
    for w in weights:
        w.grad = torch.ones_like(w)
    opt.step()
    assert all(torch.allclose(w.float(), torch.full((4, 3), 0.9), atol=0.01) for w in weights)


def test_gpu_probe_without_a_gpu_says_where_to_run_it(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the probe would run")
    proc = run([sys.executable, "-m", "bench", "--gpu-probe", "--json", str(tmp_path / "p.json")],
               60, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "has none" in proc.stderr and "--profile" in proc.stderr
    assert not (tmp_path / "p.json").exists()


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one state per process: each step here starts from none and leaves none
    (the trainer clears it the same way before a run)."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_sdxl_rows_run_at_smoke_size_and_print_their_settings(tmp_path, capsys,
                                                              fresh_accelerate):
    """The sdxl_lora_1024 row's reference (diffusers' SDXL LoRA script's step) and ours_best
    step on the tiny SDXL model at 64 px, in process (the slow test above runs the CLI on one
    configuration per code path), and the row prints each one's effective settings."""
    from bench import cases as C
    from bench.cli import build_runs, metrics, print_entry
    from bench.measure import Clock
    case = {c.name: c for c in C.cases()}["sdxl_lora_1024"]
    assert not case.skip and case.model_type == "sdxl" and case.resolution == 1024
    data = C.write_data(tmp_path / "images", C.TINY)
    builders = build_runs(case, C.build_model(True, "sdxl"), data, tmp_path, "bf16")
    runs = {}
    for name in ("reference", "ours_best"):
        runner, clock = builders[name](), Clock()
        loss = clock.time(runner.step, 1)
        assert loss == loss and loss > 0, name  # finite
        runs[name] = {**metrics(case, clock, 1, runner, loss), "ratio_to_reference": 1.0}
        runner.close()
    ref, ours = runs["reference"]["settings"], runs["ours_best"]["settings"]
    assert ref["script"] == "train_dreambooth_lora_sdxl.py" and ref["resolution"] == C.TINY
    assert ref["lora_rank"] == 16 and ref["text"] == "both encoders once, before training"
    assert ref["unet"] == "base in torch.bfloat16, LoRA in torch.bfloat16"  # as under bf16 there
    assert ours["latents"] == "cached" and ours["resolution"] == C.TINY
    assert ref["optimizer"] == "torch.optim.AdamW [foreach]"  # as torch picks on a GPU
    assert ours["optimizer"] == "adamw [fused]"  # as backends._adamw builds it on a GPU
    print_entry({"name": case.name, "status": "ok", "runs": runs})
    out = capsys.readouterr().out
    assert out.count("settings: ") == 2
    assert "settings: script=train_dreambooth_lora_sdxl.py, resolution=64" in out


def test_the_sdxl_reference_trains_the_scripts_lora_layers_and_conditions_on_size(
        tmp_path, fresh_accelerate):
    """What the SDXL reference trains and feeds the UNet, as the script does: LoRA on
    to_k/to_q/to_v/to_out.0 only (nothing else trainable), the prompt encoded once by both
    encoders, each image's (original size, crop corner, target size) as its time ids."""
    from bench import cases as C
    from bench.reference_sdxl import SDXLReferenceStep
    comp = C.build_model(True, "sdxl")
    data = C.write_data(tmp_path / "images", C.TINY)
    ref = SDXLReferenceStep(comp, data, 2, False, False, "no", lora_rank=4)
    trained = {n for n, p in ref.unet.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    targets = ("to_k", "to_q", "to_v", "to_out.0")
    layers = {n.split(".lora_")[0] for n in trained}
    assert {t for t in targets if any(layer.endswith(t) for layer in layers)} == set(targets)
    assert all(layer.endswith(targets) for layer in layers)
    assert len(ref.params) == len(trained)
    hidden = comp.configs["text_encoder"]["hidden_size"] + \
        comp.configs["text_encoder_2"]["hidden_size"]
    assert ref.embeddings["hidden"].shape == (1, 77, hidden)
    assert ref.embeddings["pooled"].shape == (1, comp.configs["text_encoder_2"]["projection_dim"])
    batch = ref.next_batch()
    assert batch["pixel_values"].shape == (2, 3, C.TINY, C.TINY)
    ids = ref.time_ids(batch["original_sizes"][0], batch["crop_top_lefts"][0])
    assert ids.tolist() == [[C.TINY, C.TINY, 0, 0, C.TINY, C.TINY]]  # square 64 px images
    loss = ref.step()  # read on the host every step, as the script logs it
    assert isinstance(loss, float) and loss == loss


def test_without_cuda_a_run_is_timed_by_the_median_of_its_blocks_cpu_time_per_step():
    """On a CPU each timed block adds its CPU seconds per step, and steps/s is one over their
    median (a shared machine's other work and drift between blocks move it least)."""
    from bench.measure import Clock
    if torch.cuda.is_available():
        pytest.skip("with CUDA the clock is the synchronised wall time")
    clock = Clock()
    for n in (1, 2, 1):
        clock.time(lambda: torch.ones(()), n)
    assert len(clock.per_step) == 3 and clock.steps == 4 and all(s >= 0 for s in clock.per_step)
    clock.per_step = [0.5, 0.1, 0.2]  # (the figures themselves are the machine's)
    assert clock.steps_per_s() == pytest.approx(5.0)
