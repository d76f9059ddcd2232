"""Training health: the health/* scalars of every log point and the one posterior-collapse
warning. The ELBO collapse case of test_pixel_vae.py (one template plus pixel noise, which a PixelCNN++
models without z) trained through the trainer warns once; the same run without the KL (reg=none)
keeps using z and does not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dist_vae.config import HealthConfig
from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig
from dist_vae.models.pixel_vae import PixelVAE, PixelVAEConfig
from dist_vae.run_layout import RunDir
from tests.engine_util import ROOT, check, run
from tests.model_fixtures import noise_template, template_plus_noise

HEALTH = ["health/active_units", "health/active_units_relative", "health/kl_per_unit_min",
          "health/kl_per_unit_median", "health/posterior_variance"]  # fmt: skip
STEPS, LOG_EVERY, COLLAPSE_LOGS = 150, 10, HealthConfig().collapse_logs
# The model and optimiser of test_the_elbo_collapses_the_code_when_the_decoder_can_model_the_data_alone.
COLLAPSE_RUN = [
    "data.resolution=8", "data.batch_size=16", "data.num_workers=0", "data.random_flip=false",
    "model.kind=pixel_vae", "model.latent_dim=8", "model.nr_resnet=1", "model.nr_filters=16",
    "model.nr_mix=2", "model.n_stages=2", "model.encoder_channels=16", "model.dropout=0",
    f"train.steps={STEPS}", "train.lr=2e-3", "train.warmup=0", "train.schedule=constant",
    "train.grad_clip=0", "train.ema_decay=0", "train.spike_window=0", f"train.log_every={LOG_EVERY}",
    "train.eval_every=1000", "train.sample_every=1000", "train.checkpoint_every=1000",
]  # fmt: skip


@pytest.mark.parametrize("kind", ["pixel_vae", "iterative_vae"])
def test_the_code_statistics_are_per_unit_and_sum_to_the_logged_kl(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "pixel_vae":
        model: torch.nn.Module = PixelVAE(
            PixelVAEConfig(reg="elbo", latent_dim=6, nr_resnet=1, nr_filters=8, nr_mix=2, n_stages=1,
                           encoder_channels=8), 8)  # fmt: skip
    else:
        model = IterativeVAE(IterativeVAEConfig(refine_steps=2, latent_dims=[2, 3], channels=4), 8)
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    out = model(x)
    code = out.code
    assert code is not None and code.mean.shape == (5, model.latent_dim)
    assert code.kl.shape == code.variance.shape == (model.latent_dim,)
    assert torch.allclose(code.kl.sum(), out.scalars["kl"], rtol=1e-5)
    assert (code.kl >= 0).all() and (code.variance > 0).all() and not code.mean.requires_grad
    # The units in posterior()'s order (the iterative VAE: step 1's latents first, whose posterior
    # sees the empty canvas on any path).
    assert torch.allclose(code.mean[:, :5], model.posterior(x).mean[:, :5], atol=1e-6)


@pytest.fixture(scope="module")
def collapse_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 template-plus-noise PNGs (8 px) as PNG shards, a few in val."""
    images = tmp_path_factory.mktemp("collapse_images")
    g = torch.Generator().manual_seed(1)
    x = template_plus_noise(512, noise_template(g), g)
    pixels = torch.round((x + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, image in enumerate(pixels):
        Image.fromarray(np.ascontiguousarray(image)).save(images / f"img{i:04d}.png")
    out = tmp_path_factory.mktemp("collapse_shards")
    cmd = [sys.executable, "tools/make_shards.py", "--source", f"folder:{images}", "--out", str(out),
           "--resolution", "8", "--format", "png", "--val-fraction", "0.05", "--no-progress"]  # fmt: skip
    check(run(cmd))
    return out


def train(shards: Path, run_dir: Path, reg: str) -> tuple[subprocess.CompletedProcess, EventAccumulator]:
    cmd = [sys.executable, "dist_vae/train.py", "--config", str(ROOT / "configs" / "debug.yaml"),
           f"run_dir={run_dir}", f"data.path={shards}", *COLLAPSE_RUN, f"model.reg={reg}"]  # fmt: skip
    proc = run(cmd)
    check(proc)
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    for tag in HEALTH:
        assert [e.step for e in events.Scalars(tag)] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), tag
    return proc, events


@pytest.mark.slow
def test_an_elbo_run_whose_code_collapses_warns_once_and_a_run_without_the_kl_does_not(
    collapse_shards: Path, tmp_path: Path
) -> None:
    proc, events = train(collapse_shards, tmp_path / "elbo", "elbo")
    warning = (
        r"^warning: posterior collapse at step (\d+): 0 of 8 latent units active \(relative to their "
        r"posterior spread\), KL/unit median (\S+) nats, .*\(model\.reg=elbo\)"
    )
    warnings = re.findall(warning, proc.stderr, re.M)
    assert len(warnings) == 1 and proc.stderr.count("posterior collapse") == 1, proc.stderr[-3000:]
    step, median = int(warnings[0][0]), float(warnings[0][1])
    # The warning comes at the health.collapse_logs-th log point in a row with no active unit.
    active = [(e.step, e.value) for e in events.Scalars("health/active_units_relative")]
    values = [v for _, v in active]
    streaks = [
        s
        for i, (s, _) in enumerate(active)
        if i + 1 >= COLLAPSE_LOGS and not any(values[i + 1 - COLLAPSE_LOGS : i + 1])
    ]
    assert step == streaks[0]
    at_step = {e.step: e.value for e in events.Scalars("health/kl_per_unit_median")}[step]
    assert median == pytest.approx(at_step, rel=1e-2)

    proc, events = train(collapse_shards, tmp_path / "none", "none")
    assert "posterior collapse" not in proc.stderr
    assert min(e.value for e in events.Scalars("health/active_units_relative")) > 0
    assert events.Scalars("health/kl_per_unit_median")[-1].value > 0.5
