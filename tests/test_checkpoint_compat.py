"""Runs an older tree trained, in checkpoint format 2, still load and give the same loss.

The fixtures under tests/fixtures/checkpoint_format2/ are real run directories (config.yaml and a
checkpoint exactly as that tree's trainer wrote it) with a fixed batch and what that tree computed on
it; their generator, tests/fixtures/checkpoint_format2/make_checkpoints.py, says how they are made.
Each is loaded through today's `load_run` (COMPLETE marker verified, safetensors only, every tensor
name and shape matched) and measured by the same function that recorded the expected values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from dist_vae.checkpoint import OPTIMIZER_FILE, load_checkpoint, newest_verified, read_tensors
from dist_vae.config import load_config
from dist_vae.engine.backend import make_optimizer
from dist_vae.models import build_model
from dist_vae.run_dir import load_run
from dist_vae.run_layout import RunDir
from tests.fixtures.checkpoint_format2.make_checkpoints import DTYPES, measure
from tests.model_fixtures import one_thread  # noqa: F401

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoint_format2"
# float64: the fused ops may move the last bits (fused_ops.py: 1e-15 over a whole model).
RELATIVE = {"float64": 1e-12, "float32": 1e-5}


def assert_close(name: str, value: float, expected: float, rtol: float) -> None:
    assert abs(value - expected) <= rtol * abs(expected), f"{name}: {value!r}, the fixture gave {expected!r}"


@pytest.mark.parametrize("kind", ["pixel_vae", "iterative_vae"])
@pytest.mark.usefixtures("one_thread")
def test_format2_checkpoint_loads_and_gives_the_same_losses_and_gradients(kind: str) -> None:
    run_dir = FIXTURES / kind
    expected = json.loads((run_dir / "expected.json").read_text())
    batch = read_tensors(run_dir / "batch.safetensors")["x"]
    loaded = load_run(run_dir)
    assert (loaded.step, loaded.ema, loaded.cfg.model.kind) == (2, False, kind)
    for dtype_name, dtype in DTYPES.items():
        found = measure(kind, load_run(run_dir).model, batch, dtype)
        assert found.keys() == expected[dtype_name].keys(), dtype_name
        for objective, values in found.items():
            want, rtol = expected[dtype_name][objective], RELATIVE[dtype_name]
            label = f"{kind} {dtype_name} {objective}"
            assert_close(f"{label} eval loss", values["eval_loss"], want["eval_loss"], rtol)
            assert_close(f"{label} train loss", values["train_loss"], want["train_loss"], rtol)
            assert values["grad_norms"].keys() == want["grad_norms"].keys(), label
            for module, norm in values["grad_norms"].items():
                assert_close(f"{label} grad norm of {module}", norm, want["grad_norms"][module], rtol)


@pytest.mark.usefixtures("one_thread")
def test_format2_optimizer_state_resumes_on_the_fused_adamw() -> None:
    """The fixture saved `fused: None` with its moments; the trainer's optimizer is fused, and the
    resumed run must keep the fused kernel and the saved moments, then step them, with the weight
    decay this run configures (the fixture saved 0)."""
    run_dir = FIXTURES / "pixel_vae"
    cfg = load_config(RunDir(run_dir).config, ["train.weight_decay=0.25"])
    model = build_model(cfg.model, cfg.data.resolution, cfg.train.gradient_checkpointing)
    optimizer = make_optimizer(model, cfg)
    assert {group["fused"] for group in optimizer.param_groups} == {True}
    acc = Accelerator(cpu=True)
    path = newest_verified(run_dir)
    load_checkpoint(acc, path, model=model, optimizer=optimizer, ema=None)
    assert {group["fused"] for group in optimizer.param_groups} == {True}
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.25}
    saved = read_tensors(path / OPTIMIZER_FILE)
    names = dict(model.named_parameters())
    name = "decoder.up_u.0.0.conv_out.conv.v"
    assert torch.equal(optimizer.state[names[name]]["exp_avg"], saved[f"exp_avg/{name}"])
    before = names[name].detach().clone()
    model(read_tensors(run_dir / "batch.safetensors")["x"] / 127.5 - 1, step=3).total().backward()
    optimizer.step()
    assert float(optimizer.state[names[name]]["step"]) == 3.0
    assert not torch.equal(names[name], before)
