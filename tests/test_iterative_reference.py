"""The iterative VAE's faster step against the plain reference maths, written out here:
the generator's nearest-2x upsampling + 3x3 conv and its gate mix, checkpointing that recomputes
every step whole, and the loss and logged scalars computed step by step."""

import copy
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from dist_vae.models import iterative_nets
from dist_vae.models.iterative_vae import IterativeVAE, IterativeVAEConfig
from dist_vae.models.output import LossOutput
from tests.model_fixtures import one_thread  # noqa: F401
from tests.test_iterative_vae import images, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

# sha256 of "name:shape;..." over the sorted state dict of `model()`, as checkpoint format 2 stores it
# (tests/fixtures/checkpoint_format2): a checkpoint of that layout loads strictly.
FORMAT2_STATE = "264a3eb25c199869526e1516f96a6f974db1680ca58c114c4545da1631c92305"


def reference_generator_forward(self, z, canvas, fine=0):  # Generator.forward, plain (no `fine`)
    zs = dict(zip(self.ladder, z.split(list(self.ladder.values()), dim=1), strict=True))
    skips = self.canvas_path(canvas) if self.canvas_path is not None else None
    h = None
    for level in reversed(range(len(self.sizes))):
        if h is not None:
            h = self.up[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        parts = [] if h is None else [h]
        if skips is not None:
            parts.append(skips[level])
        if level in zs:
            parts.append(self._latent_map(level, zs[level]))
        h = self.stages[level](sum(parts[1:], parts[0]))
    out = self.out(h)
    if canvas is None:
        return torch.tanh(out), None
    new, gate = torch.tanh(out[:, :3]), torch.sigmoid(out[:, 3:])
    return gate * new + (1.0 - gate) * canvas, gate


def reference_unroll(self, x, eps=None):  # IterativeVAE.unroll, reference: every step recomputed whole
    canvas = torch.zeros_like(x)
    outputs = []
    for t, step in enumerate(self.steps):
        noise = eps[t] if eps is not None else torch.randn(x.shape[0], self.latent_size, device=x.device)
        previous = canvas.detach() if self.mode == "greedy" else canvas
        if self.gradient_checkpointing and torch.is_grad_enabled():
            out = checkpoint(step, x, previous, noise, use_reentrant=False)
        else:
            out = step(x, previous, noise)
        outputs.append(out)
        canvas = out.canvas
    return outputs


def reference_forward(self, x, step=0):  # IterativeVAE.forward, plain: each step's terms apart
    outputs = self.unroll(x)
    dims = x[0].numel()
    beta = self.kl_weight(step)
    loss = torch.stack([(self.rec_weight * o.sse + beta * o.kl).mean() for o in outputs]).sum() / dims
    scalars = {}
    for t, o in enumerate(outputs, start=1):
        scalars[f"rec/step{t}"] = o.sse.detach().mean() / dims
        scalars[f"kl/step{t}"] = o.kl.detach().mean()
        if o.gate is not None:
            scalars[f"gate/step{t}"] = o.gate.float().flatten(1).mean(dim=1).mean()
    scalars["rec"] = torch.stack([scalars[f"rec/step{t}"] for t in range(1, len(outputs) + 1)]).sum()
    total_kl = torch.stack([o.kl.detach() for o in outputs]).sum(0)
    scalars["kl"] = total_kl.mean()
    scalars["kl_weight"] = torch.tensor(beta)
    nll = (-self._log_likelihood(outputs[-1].sse.detach(), dims) + total_kl).mean() / dims
    scalars["bpd"] = nll / math.log(2.0)
    return LossOutput(loss=loss, scalars=scalars)


class ReferenceGenerator(iterative_nets.Generator):
    forward = reference_generator_forward


class ReferenceIterativeVAE(IterativeVAE):
    unroll = reference_unroll
    forward = reference_forward


def model(dtype: torch.dtype = torch.float32, **kwargs: object) -> IterativeVAE:
    """32 px (levels 32, 16, 8, 4: the policy keeps the 8 and 4 px convolutions), weights perturbed."""
    checkpointing = bool(kwargs.pop("checkpointing", False))
    torch.manual_seed(0)
    args: dict = {"refine_steps": 3, "latent_dims": [4, 6], "channels": 8, "kl_warmup": 0.0, **kwargs}
    vae = IterativeVAE(IterativeVAEConfig(**args), 32, gradient_checkpointing=checkpointing)
    perturb(vae)
    return vae.to(dtype)


def as_reference(vae: IterativeVAE) -> IterativeVAE:
    """A copy (same parameters, same names) that runs the reference maths."""
    ref = copy.deepcopy(vae)
    ref.__class__ = ReferenceIterativeVAE
    for module in ref.modules():
        if type(module) is iterative_nets.Generator:
            module.__class__ = ReferenceGenerator
    return ref


def loss_and_grads(
    vae: IterativeVAE, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(7)  # the same noise for both, drawn in the default dtype: set it to x's
    default = torch.get_default_dtype()
    torch.set_default_dtype(x.dtype)
    try:
        out = vae(x, step=500)
    finally:
        torch.set_default_dtype(default)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in vae.named_parameters()}, out.scalars


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize(("mode", "checkpointing"), [("greedy", False), ("greedy", True), ("joint", True)])
def test_loss_and_gradients_equal_the_reference_maths(
    dtype: torch.dtype, rtol: float, mode: str, checkpointing: bool
) -> None:
    fast = model(dtype, mode=mode, checkpointing=checkpointing)
    x = images(3, 32).to(dtype)
    loss, grads, scalars = loss_and_grads(fast, x)
    ref_loss, ref_grads, ref_scalars = loss_and_grads(as_reference(fast), x)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    assert scalars.keys() == ref_scalars.keys()
    for key, value in ref_scalars.items():
        torch.testing.assert_close(scalars[key].to(value), value, rtol=rtol, atol=0, msg=key)
    # Relative to the largest gradient: a conv bias before a GroupNorm has a true gradient of 0, so its
    # computed one is rounding noise (1e-17 in float64) that no per-tensor relative bound fits.
    scale = max(g.abs().max() for g in ref_grads.values())
    assert all(g.any() for g in ref_grads.values())
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=rtol * scale, msg=name)


def test_upsample_conv_equals_nearest_upsampling_then_conv_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1).double()
    h = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 7, 6, 8, generator=g, dtype=torch.float64)
    results = []
    for out in (iterative_nets.upsample_conv(h, conv), conv(F.interpolate(h, scale_factor=2.0))):
        results.append((out, *torch.autograd.grad(out, (h, conv.weight, conv.bias), grad_out)))
    for new, ref in zip(*results, strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-13, atol=1e-13)


def test_parameter_names_and_shapes_are_those_of_checkpoint_format2() -> None:
    state = model().state_dict()
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items()))
    assert len(state) == 362 and sum(v.numel() for v in state.values()) == 784375
    assert hashlib.sha256(text.encode()).hexdigest() == FORMAT2_STATE
    IterativeVAE(IterativeVAEConfig(refine_steps=3, latent_dims=[4, 6], channels=8), 32).load_state_dict(
        state, strict=True
    )


def conv_flops(vae: IterativeVAE, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        vae(x, step=500).loss.backward()
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if "convolution" in str(op))


def test_checkpointing_recomputes_only_the_fine_levels_of_all_but_the_last_step() -> None:
    x = images(2, 32)
    plain, ckpt = model(), model(checkpointing=True)
    whole = as_reference(ckpt)  # recomputes every step whole
    calls = [0, 0, 0]
    for t, step in enumerate(ckpt.steps):  # the stem is in the recomputed finest levels
        step.encoder.path.stem.register_forward_hook(lambda *_, t=t: calls.__setitem__(t, calls[t] + 1))
    base = conv_flops(plain, x)
    extra, extra_whole = conv_flops(ckpt, x) - base, conv_flops(whole, x) - base
    assert calls == [2, 2, 1]  # steps 1 and 2 ran again in backward, the last did not
    # The reference recomputes all 3 steps' forward convolutions; now steps 1 and 2 recompute their 32
    # and 16 px levels and nothing of the 8 and 4 px ones
    # (in this 4-level pyramid ~40% of the FLOPs; ~60% at 256 px).
    recomputed = extra / (2 * extra_whole / 3)  # of steps 1 and 2's forward convolution FLOPs
    assert 0.4 < recomputed < 0.6  # measured 0.55
