"""torch.compile (train.compile) computes the same loss and gradients as eager, with and without
gradient checkpointing. "aot_eager" runs dynamo and AOTAutograd (the graphs, functionalisation and
the checkpoint operator the real compiler sees) in seconds; one slow test runs inductor itself."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config
from torch import nn
from torch._dynamo.testing import CompileCounter

from dist_vae.config import load_config
from dist_vae.models import build_model
from tests.model_fixtures import one_thread  # noqa: F401  (fixture)
from tests.test_plan import RESOLUTION, TINY, images, tiny_model


def loss_and_grads(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(7)  # dropout masks, z noise and the MMD prior draw: the same in both runs
    out = model(images(4), step=3)
    out.total().backward()
    return out.loss.detach(), [p.grad for p in model.parameters()]


def check_agreement(kind: str, checkpointing: bool, backend: str) -> None:
    eager = tiny_model(kind, checkpointing)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    loss, grads = loss_and_grads(eager)
    compiled.compile(backend=backend)  # in place, as the trainer does: the iterative VAE step by step
    loss_c, grads_c = loss_and_grads(compiled)
    torch.testing.assert_close(loss_c, loss, rtol=1e-4, atol=0)
    assert all(g is not None for g in grads)
    names = [n for n, _ in eager.named_parameters()]
    for name, g, g_c in zip(names, grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["pixel_vae", "iterative_vae"])
def test_compiled_graphs_match_eager(kind: str, checkpointing: bool) -> None:
    check_agreement(kind, checkpointing, "aot_eager")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_inductor_matches_eager_with_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PixelVAE: checkpointed blocks with dropout masks and weight norm, the harder graph. (The
    iterative VAE, compiled step by step, is covered through aot_eager above.)"""
    # A private kernel cache: concurrent compiles sharing /tmp/torchinductor_$USER raced ("file too short").
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with inductor_config.patch(fallback_random=True):  # eager's RNG, not inductor's own
        check_agreement("pixel_vae", True, "inductor")


@pytest.mark.usefixtures("one_thread")
def test_iterative_vae_compiles_one_graph_for_the_first_step_and_one_for_the_rest() -> None:
    """Regional compilation: refinement steps 2..T reuse one graph, so compile time does not grow with T."""
    model = build_model(load_config(None, [*TINY["iterative_vae"], "model.refine_steps=4"]).model, RESOLUTION)
    counter = CompileCounter()
    torch._dynamo.reset()
    model.compile(backend=counter)
    model(images(2), step=0).total().backward()
    assert counter.frame_count == 2
