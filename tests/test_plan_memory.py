"""The planner's figures against direct measurements of real forwards on tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from dist_vae.config import load_config
from dist_vae.flops import flops_per_image, lookup_peak, peak_flops
from dist_vae.models import build_model
from dist_vae.step_time import (
    EAGER_S_PER_OP,
    MFU,
    flops_and_operations,
    host_bound_warning,
    operations_per_step,
    predict,
)
from tools.plan_memory import Activations, activations, largest_batch, parse_bytes

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "pixel_vae": ["model.kind=pixel_vae", "model.nr_resnet=1", "model.nr_filters=8", "model.nr_mix=2",
                  "model.n_stages=2", "model.latent_dim=4", "model.encoder_channels=8"],
    "iterative_vae": ["model.kind=iterative_vae", "model.refine_steps=2", "model.latent_dims=[4,4]",
                      "model.channels=4"],
}  # fmt: skip
RESOLUTION = 16


def tiny_model(kind: str, checkpointing: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return build_model(load_config(None, TINY[kind]).model, RESOLUTION, checkpointing)


def images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1)) * 2 - 1


def saved_bytes(model: nn.Module, batch: int) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one real forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images(batch), step=0).total().backward()
    return sum(saved.values())


@pytest.mark.parametrize("kind", sorted(TINY))
def test_flops_per_image_matches_a_real_counted_step(kind: str) -> None:
    model = tiny_model(kind)
    with FlopCounterMode(display=False) as counter:
        model(images(2), step=0).total().backward()
    assert counter.get_total_flops() == 2 * flops_per_image(model, RESOLUTION)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images(2), step=0)
    assert counter.get_total_flops() == 2 * flops_per_image(model, RESOLUTION, training=False)


def test_flops_ignore_the_recomputation_of_checkpointing() -> None:
    plain, ckpt = tiny_model("pixel_vae"), tiny_model("pixel_vae", checkpointing=True)
    assert flops_per_image(ckpt, RESOLUTION) == flops_per_image(plain, RESOLUTION)
    assert all(m.gradient_checkpointing for m in ckpt.modules() if hasattr(m, "gradient_checkpointing"))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_activation_bytes_per_image_match_saved_tensors_at_batch_3(kind: str) -> None:
    with FakeTensorMode():
        fake = build_model(load_config(None, TINY[kind]).model, RESOLUTION, False)
        planned = activations(fake, RESOLUTION, "fp32")
    measured = (saved_bytes(tiny_model(kind), 3) - saved_bytes(tiny_model(kind), 1)) / 2
    assert planned.per_image == pytest.approx(measured, rel=0.1)


def test_checkpointing_lowers_activation_memory() -> None:
    cfg = load_config(None, TINY["pixel_vae"]).model
    with FakeTensorMode():
        plain = activations(build_model(cfg, RESOLUTION, False), RESOLUTION, "fp32")
        ckpt = activations(build_model(cfg, RESOLUTION, True), RESOLUTION, "fp32")
    assert 0 < ckpt.per_image < 0.6 * plain.per_image


def test_largest_batch_is_the_last_that_fits() -> None:
    acts = Activations(per_image=100.0, fixed=50.0)
    assert largest_batch(1000.0, 350.0, acts) == 6
    assert 350.0 + acts.at(6) <= 1000.0 < 350.0 + acts.at(7)
    assert largest_batch(300.0, 350.0, acts) == 0
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1.5 GB") == 1_500_000_000
    with pytest.raises(ValueError, match="80 parsecs"):
        parse_bytes("80 parsecs")


def test_peak_table() -> None:
    assert lookup_peak("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert lookup_peak("NVIDIA H100 PCIe", torch.float16) == 756.5e12
    assert lookup_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert lookup_peak("NVIDIA A10", torch.bfloat16) == 125e12
    assert lookup_peak("Tesla V100-SXM2-32GB", torch.bfloat16) is None  # no bf16 tensor cores
    assert lookup_peak("Some Future GPU", torch.bfloat16) is None
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.float32, None) is None
    assert peak_flops(cpu, torch.float32, 2.0e12) == 2.0e12


def test_planner_runs_on_the_debug_config() -> None:
    out = subprocess.run(
        [sys.executable, "tools/plan_memory.py", "--config", "configs/debug.yaml", "--gpu-mem", "16GiB"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    for label in ("parameters", "FLOPs per image", "activations per image", "largest batch per GPU in 16GiB"):
        assert label in out, out


def test_step_time_names_the_regime_and_the_smallest_compute_bound_batch() -> None:
    ops, flops, peak = 50_000, 287e9, 989e12
    eager = predict(ops, flops, 8, peak, "eager")
    assert eager.floor_s == pytest.approx(ops * EAGER_S_PER_OP) and eager.regime == "host-bound"
    assert eager.mfu == pytest.approx(MFU * eager.compute_s / eager.floor_s)
    assert predict(ops, flops, eager.min_batch, peak, "eager").regime == "compute-bound"
    assert predict(ops, flops, eager.min_batch - 1, peak, "eager").regime == "host-bound"
    floors = [predict(ops, flops, 8, peak, mode).floor_s for mode in ("eager", "compiled", "graphed")]
    assert floors == sorted(floors, reverse=True)
    assert "host-bound in eager mode" in host_bound_warning(ops, flops, 8, peak, "eager")
    assert host_bound_warning(ops, flops, 10 * eager.min_batch, peak, "eager") == ""


def test_operations_per_step_count_the_recomputation_and_not_the_batch() -> None:
    plain = operations_per_step(lambda: tiny_model("iterative_vae"), RESOLUTION)
    checkpointed = operations_per_step(lambda: tiny_model("iterative_vae", checkpointing=True), RESOLUTION)
    assert 0 < plain < checkpointed
    model = tiny_model("iterative_vae")
    flops, traced = flops_and_operations(model, RESOLUTION)
    assert flops == flops_per_image(model, RESOLUTION) and 0 < traced <= plain
