"""A third model touches only models/ and the registry: a test-only linear Gaussian VAE, registered
here through the public registry, is configured, trained, sampled and evaluated by the same code the
two real models go through (config loader, trainer, tools/sample.py, tools/evaluate.py)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from dist_vae import train
from dist_vae.config import ConfigError, load_config
from dist_vae.models import GenerativeModel, LossOutput, Posterior, build_model, register_model
from dist_vae.models.regularizers import diag_normal_log_density, gaussian_kl
from dist_vae.run_layout import RunDir
from dist_vae.schema import at_least
from tests.data_fixtures import make_demo_shards
from tests.model_fixtures import fit
from tools import evaluate, sample

ROOT = Path(__file__).resolve().parent.parent
SIGMA = 0.2  # the decoder's fixed standard deviation
BIN = math.log(2 / 255)  # log width of one 8-bit bin in [-1, 1]


@dataclass
class TinyConfig:
    kind: str = "tiny_linear"
    latent: int = at_least(3, 1)


class TinyLinearVAE(nn.Module):
    """q(z|x) and p(x|z) linear Gaussians (p's mean through tanh, fixed SIGMA)."""

    def __init__(self, cfg: TinyConfig, resolution: int, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.resolution, self.latent_dim = resolution, cfg.latent
        self.enc = nn.Linear(3 * resolution**2, 2 * cfg.latent)
        self.dec = nn.Linear(cfg.latent, 3 * resolution**2)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": list(self.parameters())}

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.enc(x.flatten(1)).chunk(2, dim=1)
        return mean, logvar.clamp(-6.0, 6.0)

    def _mean(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dec(z)).view(z.shape[0], 3, self.resolution, self.resolution)

    def _log_px(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d = (x - self._mean(z)) / SIGMA
        return (-0.5 * d.square() - math.log(SIGMA * math.sqrt(2 * math.pi)) + BIN).flatten(1).sum(1)

    def forward(self, x: torch.Tensor, step: int = 0) -> LossOutput:
        mean, logvar = self._stats(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        nll = -self._log_px(x, z) + gaussian_kl(mean, logvar)
        dims = x[0].numel()
        bpd = nll.mean().detach() / dims / math.log(2)
        return LossOutput(nll.mean() / dims, {"bpd": bpd, "kl": gaussian_kl(mean, logvar).mean().detach()})

    def prior_sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)

    def decode(self, z: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        return [self._mean(z)]

    def posterior(self, x: torch.Tensor) -> Posterior:
        return Posterior(*self._stats(x))

    def posterior_sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self._stats(x)
        return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)

    def posterior_log_prob(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        mean, logvar = self._stats(x)
        return diag_normal_log_density(z.expand_as(mean), mean, logvar)

    def log_importance_weight(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        z = self.posterior_sample(x, generator)
        log_q = self.posterior_log_prob(x, z)
        return self._log_px(x, z) + diag_normal_log_density(z) - log_q


register_model("tiny_linear", TinyConfig, TinyLinearVAE)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_shards(tmp_path_factory.mktemp("shards8"), 24, 8, 0.3)


def test_the_config_loader_and_registry_serve_the_new_kind() -> None:
    cfg = load_config(None, ["model.kind=tiny_linear", "model.latent=2"])
    assert cfg.model == TinyConfig(latent=2)
    with pytest.raises(ConfigError, match=r"model.reg' for model.kind=tiny_linear.*'latent'"):
        load_config(None, ["model.kind=tiny_linear", "model.reg=mmd"])
    with pytest.raises(ConfigError, match=r"'model.latent'; expected a value >= 1"):
        load_config(None, ["model.kind=tiny_linear", "model.latent=0"])
    assert isinstance(build_model(cfg.model, 8), GenerativeModel)


def test_a_direct_loop_with_its_loss_trains_it() -> None:
    torch.manual_seed(0)
    model = build_model(TinyConfig(), 8)
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = [h["loss"] for h in fit(model, x, opt, 40)]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


@pytest.mark.slow
def test_it_trains_samples_and_evaluates_through_the_trainer_and_the_tools(
    shards: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    code = train.main([
        "--config", "configs/debug.yaml", f"run_dir={run_dir}", f"data.path={shards}", "data.resolution=8",
        "data.batch_size=4", "data.num_workers=0", "data.shuffle_group=2", "model.kind=tiny_linear",
        "train.steps=4", "train.checkpoint_every=2", "train.eval_every=4", "train.sample_every=4",
        "train.sample_count=4", "train.warmup=1",
    ])  # fmt: skip
    assert code == 0
    assert "kind: tiny_linear" in RunDir(run_dir).config.read_text()
    assert "nr_filters" not in RunDir(run_dir).config.read_text()
    out = tmp_path / "grids"
    assert sample.main([str(run_dir), "--n", "3", "--chain-steps", "2", "--out", str(out)]) == 0
    cell = 8 + 2
    assert Image.open(out / "ancestral.png").size == (3 * cell + 2, cell + 2)
    assert Image.open(out / "chain_noise.png").size == (3 * cell + 2, 3 * cell + 2)
    assert evaluate.main([str(run_dir), "--iw-samples", "2", "--fuzz-samples", "2", "--no-progress"]) == 0
    result = json.loads(RunDir(run_dir).latest_eval.read_text())
    assert result["latent_dim"] == 3 and result["iw_bpd"] is not None and result["mi"] is not None
    assert result["fuzziness"]["decoder_spread"] == 0.0  # the decoder's mean is deterministic given z
