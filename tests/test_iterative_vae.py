import itertools
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dist_vae.config import ConfigError, load_config
from dist_vae.models import build_model
from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig, level_sizes
from dist_vae.sampling import prior_samples, reconstructions
from tests.model_fixtures import fit


def tiny(mode: str = "greedy", checkpointing: bool = False, **kwargs: object) -> IterativeVAE:
    torch.manual_seed(0)
    args: dict = {"refine_steps": 3, "latent_dims": [4, 6], "channels": 8, "kl_warmup": 0.0}
    args.update(kwargs)
    return IterativeVAE(IterativeVAEConfig(mode=mode, **args), 16, gradient_checkpointing=checkpointing)


def images(n: int, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Structured images in [-1, 1]: random 8x8 patterns, upsampled bilinearly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def perturb(model: torch.nn.Module) -> None:
    """Move every weight off its (partly zero) initialisation so that no gradient is zero by accident."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_sample_returns_t_canvases_in_range_that_change() -> None:
    model = tiny()
    storages = [{p.data_ptr() for p in step.parameters()} for step in model.steps]
    assert all(a.isdisjoint(b) for a, b in itertools.combinations(storages, 2))  # no weights shared
    canvases = prior_samples(model, 5, generator=torch.Generator().manual_seed(3))
    assert len(canvases) == 3
    for c in canvases:
        assert c.shape == (5, 3, 16, 16)
        assert c.min() >= -1 and c.max() <= 1
    for before, after in itertools.pairwise(canvases):
        assert (after - before).abs().mean() > 1e-3
    again = prior_samples(model.eval(), 5, generator=torch.Generator().manual_seed(3))
    for a, b in zip(canvases, again, strict=True):
        torch.testing.assert_close(a, b)  # same noise, same canvases; eval() changes nothing


def test_training_on_fixed_batch_lowers_loss_and_refines() -> None:
    model = tiny(channels=4)
    x = images(16)  # more than the first step's 10 latent dims can memorise in a few dozen updates
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    history = fit(model, x, opt, 60)
    losses = [h["loss"] for h in history]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert history[-1]["rec/step3"] < history[-1]["rec/step1"]
    recons = reconstructions(model, x)
    errors = [(r - x).square().mean().item() for r in recons]
    assert errors[-1] < errors[0]
    assert all(r.min() >= -1 and r.max() <= 1 for r in recons)


def last_step_loss_backward(model: IterativeVAE, x: torch.Tensor) -> None:
    torch.manual_seed(0)
    outputs = model.unroll(x)
    (outputs[-1].sse + outputs[-1].kl).mean().backward()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_greedy_stops_gradient_between_steps(checkpointing: bool) -> None:
    model = tiny("greedy", checkpointing)
    perturb(model)
    last_step_loss_backward(model, images(2))
    for step in model.steps[:-1]:
        assert all(p.grad is None or not p.grad.any() for p in step.parameters())
    assert all(p.grad is not None and p.grad.any() for p in model.steps[-1].parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_joint_sends_gradient_to_every_earlier_step(checkpointing: bool) -> None:
    model = tiny("joint", checkpointing)
    perturb(model)
    last_step_loss_backward(model, images(2))
    for t, step in enumerate(model.steps):
        for name, p in step.named_parameters():
            assert p.grad is not None and p.grad.any(), f"step {t} parameter {name} got no gradient"


@pytest.mark.parametrize("mode", ["greedy", "joint"])
def test_checkpointing_keeps_loss_and_gradients(mode: str) -> None:
    plain, ckpt = tiny(mode), tiny(mode, checkpointing=True)
    perturb(plain)
    ckpt.load_state_dict(plain.state_dict())
    calls = [0]
    ckpt.steps[1].encoder.path.stem.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    x = images(3)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(7)
        out = model(x, step=500)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert calls[0] == 2  # the step really ran again in backward
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("resolution", "batch"), [(64, 2), (128, 1), (256, 1)])
def test_large_resolutions_forward_and_backward(resolution: int, batch: int) -> None:
    cfg = load_config(None, ["model.kind=iterative_vae", "model.refine_steps=2", "model.channels=4"])
    model = build_model(cfg.model, resolution, gradient_checkpointing=resolution == 256)
    assert isinstance(model, IterativeVAE)
    assert (
        len(model.steps[0].generator.stages) == len(level_sizes(resolution)) == int(math.log2(resolution)) - 1
    )
    out = model(images(batch, resolution), step=10)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.scalars["bpd"])
    assert set(model.param_groups()) == {"main"}
    assert all(p.grad is not None for p in model.parameters())
    assert {"rec/step1", "rec/step2", "kl/step2", "rec", "kl", "bpd"} <= set(out.scalars)


def test_bpd_is_negative_elbo_of_last_step_in_bits() -> None:
    model = tiny(rec_weight=16.0, kl_warmup=100.0)
    perturb(model)
    x = images(2)
    torch.manual_seed(4)
    out = model(x, step=0)
    torch.manual_seed(4)
    outputs = model.unroll(x)
    mean, logvar = model.steps[0].encoder(x, torch.zeros_like(x))
    q0 = Normal(mean, (0.5 * logvar).exp())
    torch.testing.assert_close(kl_divergence(q0, Normal(0.0, 1.0)).sum(1), outputs[0].kl)
    sigma = math.sqrt(1 / (2 * 16.0))
    log_density = Normal(outputs[-1].canvas, sigma).log_prob(x).flatten(1).sum(1)
    total_kl = sum(o.kl for o in outputs)
    dims = x[0].numel()
    expected = ((-log_density + total_kl) / dims + math.log(127.5)).mean() / math.log(2)
    torch.testing.assert_close(out.scalars["bpd"], expected)
    # KL warm-up: weight 0 at step 0, 1 - 1/e after kl_warmup steps; the loss differs by exactly that.
    torch.manual_seed(4)
    later = model(x, step=100)
    torch.testing.assert_close(later.loss - out.loss, (1 - math.exp(-1)) * total_kl.mean() / dims)


def test_single_step_baseline_and_bad_settings_are_named() -> None:
    cfg = load_config(
        None, ["model.kind=iterative_vae", "model.refine_steps=1", "model.latent_dims=[80,120]"]
    )
    model = build_model(cfg.model, 32)
    assert len(model.steps) == 1 and model.latent_size == 200
    assert len(prior_samples(model, 2)) == 1
    with pytest.raises(ConfigError, match=r"model\.latent_dims"):
        IterativeVAE(IterativeVAEConfig(latent_dims=[4, 4, 4, 4]), 16)  # 16 px has only 3 levels (16, 8, 4)
    with pytest.raises(ConfigError, match="power of two"):
        IterativeVAE(IterativeVAEConfig(), 48)
    with pytest.raises(ValueError, match=r"\[B, 3, 16, 16\]"):
        tiny()(torch.zeros(2, 3, 32, 32))


def test_bf16_autocast_with_checkpointing_trains_and_samples() -> None:
    model = tiny("joint", checkpointing=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(2), step=10)
        canvases = prior_samples(model, 2)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(c.dtype == torch.float32 and c.abs().max() <= 1 for c in canvases)
