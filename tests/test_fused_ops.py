"""The fused gated-resnet input against the unfused reference maths, written out here."""

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_vae.models import layers, pixelcnnpp
from dist_vae.models import logistic_mixture as lm
from dist_vae.models.fused_ops import padded_concat_elu
from dist_vae.models.pixelcnnpp import PixelCNNpp
from tests.model_fixtures import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_concat_elu(xs: tuple[torch.Tensor, ...], padding, drop, dropout: float) -> torch.Tensor:
    x = torch.cat(xs, dim=1)
    h = F.elu(torch.cat([x, -x], dim=1))
    if drop is not None:
        h = h * ~drop / (1.0 - dropout)
    return F.pad(h, padding)


def reference_block(self, x, z, drop, *skips, cond=None, weights=None):
    """GatedResnet._block, unfused: each convolution normalises its own weight and the block computes
    its own latent bias (this forward's precomputed `cond` and `weights` are ignored)."""
    h = self.conv_in(layers.concat_elu(x))
    if self.skip is not None:
        h = h + self.skip(layers.concat_elu(torch.cat(skips, dim=1)))
    h = layers.concat_elu(h)
    if drop is not None:
        h = h * ~drop / (1.0 - self.dropout)
    h = self.conv_out(h)
    if self.cond is not None:
        h = h + self.cond(z)[:, :, None, None]
    return layers.gated_sum(x, h)


class ReferenceGatedResnet(layers.GatedResnet):
    _block = reference_block


def reference_forward(self, x, z=None):  # PixelCNNpp.forward, plain: every layer on its own
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    outputs = []
    for layer in self.schedule:
        source = x if layer.source == pixelcnnpp.IMAGE else outputs[layer.source]
        skips, first = tuple(outputs[s] for s in layer.skips), layer.modules[0]
        if layer.kind == "init_u":
            outputs.append(layers.down_shift(first(source)))
        elif layer.kind == "init_ul":
            outputs.append(layers.down_shift(first(source)) + layers.right_shift(layer.modules[1](source)))
        elif layer.kind == "block":
            outputs.append(first(source, skips, z=z))
        else:
            outputs.append(first(source))
    return self.out(F.elu(outputs[-1]))


class ReferencePixelCNNpp(PixelCNNpp):
    forward = reference_forward


def as_reference(model: PixelCNNpp) -> PixelCNNpp:
    """A copy (same parameters, same names) that runs the reference maths: unfused gated resnets, each
    layer normalising its own weights and computing its own latent bias at every call."""
    ref = copy.deepcopy(model)
    ref.__class__ = ReferencePixelCNNpp
    for module in ref.modules():
        if type(module) is layers.GatedResnet:
            module.__class__ = ReferenceGatedResnet
    return ref


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("padding", [(0, 0, 0, 0), (1, 1, 1, 0), (1, 0, 1, 0)])
def test_padded_concat_elu_equals_the_unfused_ops_to_the_last_bits(padding, dropout: float) -> None:
    g = torch.Generator().manual_seed(0)
    xs = tuple(torch.randn(2, c, 5, 6, generator=g, dtype=torch.float64) for c in (3, 4))
    drop = torch.rand(2, 14, 5, 6, generator=g) < dropout if dropout else None
    outs, grads = [], []
    for fn in (reference_concat_elu, padded_concat_elu):
        leaves = tuple(x.clone().requires_grad_() for x in xs)
        out = fn(leaves, padding, drop, dropout)
        out.backward(torch.linspace(-2, 3, out.numel(), dtype=torch.float64).reshape(out.shape))
        outs.append(out.detach())
        grads.append([x.grad for x in leaves])
    # Same formulas; torch's vectorised and scalar exp differ in the last bit, and which elements take
    # which path depends on the tensors' shapes and strides, so values may differ by an ulp or so.
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-14, atol=1e-15)
    for ref, new in zip(*grads, strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-14, atol=1e-15)  # values are O(1)


def loss_and_gradients(net: PixelCNNpp, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mixture parameters, loss and gradients on a fixed batch, with dropout masks from a fixed seed."""
    net = net.to(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 256, (2, 3, 8, 8), generator=g) / 127.5 - 1).to(dtype)
    z = torch.randn(2, 4, generator=g, dtype=dtype)
    torch.manual_seed(2)
    params = net(x, z)
    loss = -lm.log_prob(x, params).mean()
    loss.backward()
    return params.detach(), loss.detach(), {k: p.grad for k, p in net.named_parameters()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_pixelcnnpp_loss_and_gradients_equal_the_reference(checkpointing: bool) -> None:
    """Same state dict (names and shapes), same outputs, loss and gradients as the unfused reference,
    with dropout, skips and z all in play. In float64 they agree to 1e-12 (only summation order and
    exp's last bit differ). In float32 outputs and loss agree to 1e-5; a gradient is held to 1e-5 of
    the float64 reference's or to twice the float32 reference's own rounding error, whichever is
    larger: the reference itself moves by 3e-5 between one and two threads at this size."""
    torch.manual_seed(0)
    model = PixelCNNpp(1, 8, 2, 2, cond_dim=4, dropout=0.5, gradient_checkpointing=checkpointing).double()
    reference = as_reference(model)
    reference.load_state_dict(model.state_dict(), strict=True)
    exact = loss_and_gradients(copy.deepcopy(reference), torch.float64)
    new = loss_and_gradients(copy.deepcopy(model), torch.float64)
    assert relative(new[0], exact[0]) <= 1e-12 and relative(new[1], exact[1]) <= 1e-12
    assert new[2].keys() == exact[2].keys()
    for name, grad in exact[2].items():
        assert relative(new[2][name], grad) <= 1e-12, name
    ref32 = loss_and_gradients(reference, torch.float32)
    new32 = loss_and_gradients(model, torch.float32)
    assert relative(new32[0], ref32[0]) <= 1e-5 and relative(new32[1], ref32[1]) <= 1e-5
    for name, grad in exact[2].items():
        error, allowed = relative(new32[2][name], grad), max(1e-5, 2 * relative(ref32[2][name], grad))
        assert error <= allowed, (
            f"{name}: float32 gradient off by {error:.1e}, the reference by {allowed / 2:.1e}"
        )
