"""train.compile=auto compiles on a GPU only, `on` anywhere, `off` never; and torch.compile computes
the same loss and gradients as eager, with and without gradient checkpointing. "aot_eager" runs
dynamo and AOTAutograd (the graphs, functionalisation and the checkpoint operator the real compiler
sees) in seconds; one slow test runs inductor itself, under DDP as the trainer does."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist
from torch import nn
from torch._dynamo.testing import CompileCounter
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_vae.config import load_config
from dist_vae.engine.backend import compiles
from dist_vae.models import build_model
from tests.model_fixtures import one_thread  # noqa: F401  (fixture)
from tests.test_plan_memory import RESOLUTION, TINY, images, tiny_model

# The smallest PixelVAE graph with everything the inductor test is about: one resolution stage (each
# stage adds its own set of C++ kernels to build, the bulk of the test's time) of checkpointed gated
# resnets with dropout and weight norm, the encoder's z noise and the MMD prior draw.
SMALLEST = [*TINY["pixel_vae"], "model.n_stages=1"]
SMALLEST_RESOLUTION = 8


@pytest.mark.parametrize(
    ("setting", "device", "compiled"),
    [("on", "cpu", True), ("off", "cpu", False), ("auto", "cpu", False),
     ("on", "cuda", True), ("off", "cuda", False), ("auto", "cuda", True)],
)  # fmt: skip
def test_compiled_before_the_wrap_when_on_or_auto_on_a_gpu(setting: str, device: str, compiled: bool) -> None:
    cfg = load_config(None, [f"train.compile={setting}"])
    assert compiles(cfg.train, torch.device(device)) is compiled


def loss_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(7)  # dropout masks, z noise and the MMD prior draw: the same in both runs
    out = model(x, step=3)
    out.total().backward()
    return out.loss.detach(), [p.grad for p in model.parameters()]


@contextmanager
def one_process_group(store: Path) -> Iterator[None]:
    """A real gloo group of one process, so that DDP wraps the compiled model as in the trainer."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def check_agreement(
    eager: nn.Module, x: torch.Tensor, backend: str, wrap: type[nn.Module] | None = None
) -> None:
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    loss, grads = loss_and_grads(eager, x)
    compiled.compile(backend=backend)  # in place, as the trainer does: the iterative VAE step by step
    loss_c, grads_c = loss_and_grads(compiled if wrap is None else wrap(compiled), x)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=0)
    assert all(g is not None for g in grads)
    names = [n for n, _ in eager.named_parameters()]
    for name, g, g_c in zip(names, grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["pixel_vae", "iterative_vae"])
def test_compiled_graphs_match_eager(kind: str, checkpointing: bool) -> None:
    check_agreement(tiny_model(kind, checkpointing), images(4), "aot_eager")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_inductor_matches_eager_with_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PixelVAE: checkpointed blocks with dropout masks and weight norm, the harder graph, compiled
    in place and then wrapped in DDP (dynamo's DDP optimizer sees it) as the trainer does. (The
    iterative VAE, compiled step by step, is covered through aot_eager above.)"""
    # A private kernel cache: concurrent compiles sharing /tmp/torchinductor_$USER raced ("file too short").
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "kernels"))
    torch.manual_seed(0)
    eager = build_model(load_config(None, SMALLEST).model, SMALLEST_RESOLUTION, gradient_checkpointing=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, SMALLEST_RESOLUTION, SMALLEST_RESOLUTION, generator=generator) * 2 - 1
    # fallback_random: eager's RNG, not inductor's own. Scalar C++ kernels (no vec_isa) halve the
    # compile time: the graphs under test (checkpointing, RNG, DDP) are the same, and on a GPU
    # inductor writes Triton, not vectorised C++.
    patch = {"fallback_random": True, "cpp.vec_isa_ok": False}
    with one_process_group(tmp_path / "store"), inductor_config.patch(patch):
        check_agreement(eager, x, "inductor", wrap=DDP)


@pytest.mark.usefixtures("one_thread")
def test_iterative_vae_compiles_one_graph_for_the_first_step_and_one_for_the_rest() -> None:
    """Regional compilation: refinement steps 2..T reuse one graph, so compile time does not grow with T."""
    model = build_model(load_config(None, [*TINY["iterative_vae"], "model.refine_steps=4"]).model, RESOLUTION)
    counter = CompileCounter()
    torch._dynamo.reset()
    model.compile(backend=counter)
    for step in (0, 1):  # the KL warm-up reads the step outside the compiled regions: no recompile
        model(images(2), step=step).total().backward()
    assert counter.frame_count == 2


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_the_pixel_vae_compiles_to_one_graph_without_breaks_or_recompiles(checkpointing: bool) -> None:
    """A graph break (an op dynamo cannot trace, in a fused block) splits the model into hundreds of
    frames that hit the recompile limit and run eager: the loss still agrees, so only this sees it."""
    cfg = load_config(None, [*TINY["pixel_vae"], "model.dropout=0.5"]).model
    model = build_model(cfg, RESOLUTION, gradient_checkpointing=checkpointing).train()
    counter = CompileCounter()
    torch._dynamo.reset()
    model.compile(backend=counter)
    for step in (3, 4):  # the engine's step changes every call: no guard on it, no recompile
        model(images(2), step=step).total().backward()
    assert counter.frame_count == 1
