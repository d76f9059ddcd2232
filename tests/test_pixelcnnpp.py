import pytest
import torch

from dist_vae.models import logistic_mixture as lm
from dist_vae.models.pixelcnnpp import PixelCNNpp
from tests.model_fixtures import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0, **kwargs: object) -> PixelCNNpp:
    torch.manual_seed(seed)
    args: dict = dict(nr_resnet=1, nr_filters=8, nr_mix=2, n_stages=3, cond_dim=4, dropout=0.0)
    args.update(kwargs)
    return PixelCNNpp(**args)


def images(batch: int = 2, side: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), generator=g) / 127.5 - 1.0


def test_output_at_each_pixel_depends_only_on_earlier_pixels() -> None:
    model = tiny(n_stages=3)  # 8 -> 4 -> 2: the strided down/up convolutions are exercised too
    x = images(batch=1).requires_grad_(True)
    out = model(x, torch.randn(1, 4))
    assert out.shape == (1, 10 * 2, 8, 8)
    for pos in range(64):
        i, j = divmod(pos, 8)
        (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
        reach = grad[0].abs().sum(dim=0).flatten()  # per input pixel, all channels
        assert torch.all(reach[pos:] == 0), (
            f"output ({i},{j}) sees pixel {int(reach[pos:].nonzero()[0]) + pos}"
        )
        if pos > 0:
            assert reach[:pos].max() > 0, f"output ({i},{j}) sees no earlier pixel"


def test_z_changes_the_output() -> None:
    model = tiny()
    x = images()
    z = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    delta = (model(x, z) - model(x, z + 1.0)).abs()
    assert delta.min() > 0, "z must reach every pixel's parameters"


def test_checkpointing_leaves_loss_and_gradients_unchanged() -> None:
    plain = tiny(nr_filters=16, dropout=0.5)
    ckpt = tiny(nr_filters=16, dropout=0.5, gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x, z = images(batch=3), torch.randn(3, 4, generator=torch.Generator().manual_seed(2))

    def loss_and_saved_bytes(model: PixelCNNpp) -> tuple[torch.Tensor, int]:
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if t.shape[:1] == x.shape[:1]:  # activations; the weights, normalised once per forward
                saved += t.numel() * t.element_size()  # outside the blocks, are kept alike by both
            return t

        torch.manual_seed(7)  # same dropout masks in both models
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = -lm.log_prob(x, model(x, z)).mean()
        loss.backward()
        return loss.detach(), saved

    loss_plain, saved_plain = loss_and_saved_bytes(plain)
    loss_ckpt, saved_ckpt = loss_and_saved_bytes(ckpt)
    assert loss_ckpt == loss_plain
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # The blocks' internals really were dropped in the forward pass.
    assert saved_ckpt < 0.5 * saved_plain


def test_bad_inputs_are_named() -> None:
    model = tiny(n_stages=3)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*\\(n_stages-1\\) = 4"):
        model(images(side=6), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="z must be"):
        model(images(), None)
    with pytest.raises(ValueError, match="cond_dim=None"):
        tiny(cond_dim=None)(images(), torch.zeros(2, 4))
