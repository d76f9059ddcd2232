"""Fast checks of the engine's pure parts: spike detector, LR schedule, grids, checkpoint discovery, EMA,
clipping, the log window, the refusals of train.cuda_graphs, DDP's buffer broadcasts."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_vae.checkpoint import COMPLETE, CheckpointError, clean_partial, resolve_resume
from dist_vae.engine.backend import EMA, cuda_graphs_refusal, spare_buffer_broadcasts
from dist_vae.engine.monitor import Window
from dist_vae.engine.step import SpikeDetector, UpdateGate, lr_factor, preserved_rng
from dist_vae.engine.update import TorchUpdate
from dist_vae.files import image_grid
from dist_vae.models.output import CodeStats, LossOutput
from dist_vae.run_layout import RunDir
from tests.test_compile import one_process_group
from tests.test_plan_memory import tiny_model


def stable_norms(n: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (1.0 + 0.1 * torch.randn(n, generator=g)).tolist()


def test_spike_detector_skips_outliers_only_after_warmup() -> None:
    detector = SpikeDetector(window=50, k=6.0, warmup=10, max_consecutive=3)
    assert not detector.is_spike(100.0)  # no statistics yet: accepted
    detector = SpikeDetector(window=50, k=6.0, warmup=10, max_consecutive=3)
    assert not any(detector.is_spike(n) for n in stable_norms(30))
    assert 3.5 < detector.threshold() < 4.5  # median 1 + 6 x the MAD's floor of half the median
    assert detector.is_spike(10.0)
    assert not detector.is_spike(1.05)


def test_spike_detector_follows_growing_norms_without_skipping() -> None:
    # Early in a run the norms grow several-fold while the LR warms up (the debug demo went from 0.5
    # to 4 in 100 steps): that is a trend, not a string of spikes.
    detector = SpikeDetector(window=100, k=10.0, warmup=20, max_consecutive=5)
    ramp = [0.5 * 8 ** (i / 100) * (1.0 + 0.1 * (-1) ** i) for i in range(200)]
    assert not any(detector.is_spike(n) for n in ramp)
    assert detector.is_spike(10 * ramp[-1])


def test_spike_detector_cap_prevents_a_stall() -> None:
    detector = SpikeDetector(window=20, k=6.0, warmup=10, max_consecutive=2)
    for n in stable_norms(20):
        detector.is_spike(n)
    # The norm level jumps for good: two updates are skipped, the third is taken, and once the new
    # level fills half the window the threshold has moved, so training continues instead of skipping
    # forever (openai/vdvae#25).
    decisions = [detector.is_spike(50.0) for _ in range(60)]
    assert decisions[:6] == [True, True, False, True, True, False]
    assert "True" * 3 not in "".join(map(str, decisions))
    assert not any(decisions[-20:])


def test_spike_detector_state_round_trips_and_can_be_disabled() -> None:
    detector = SpikeDetector(window=20, k=3.0, warmup=5, max_consecutive=4)
    for n in [*stable_norms(10), 30.0]:
        detector.is_spike(n)
    copy = SpikeDetector(window=20, k=3.0, warmup=5, max_consecutive=4)
    copy.load_state_dict(detector.state_dict())
    assert copy.threshold() == detector.threshold() and copy.consecutive == detector.consecutive == 1
    off = SpikeDetector(window=0, k=3.0, warmup=1, max_consecutive=4)
    assert not any(off.is_spike(x) for x in [1.0, 1.0, 1e9])


def test_update_gate_counts_skips_and_notices_divergence() -> None:
    gate = UpdateGate(SpikeDetector(window=20, k=6.0, warmup=3, max_consecutive=2), max_nonfinite=3)
    nan = math.nan
    decisions = [gate.decide(step, norm, not math.isfinite(norm)) for step, norm in
                 enumerate([1.0, nan, 1.1, 0.9, 50.0, nan, nan, 1.0], 1)]  # fmt: skip
    assert decisions == ["", "nonfinite", "", "", "spike", "nonfinite", "nonfinite", ""]
    assert gate.skipped == {"nonfinite": 3, "overflow": 0, "spike": 1} and not gate.diverged  # reset
    # fp16 loss-scale overflow (finite loss) is skipped and counted apart: no sign of divergence.
    for step in range(9, 14):
        assert gate.decide(step, math.inf, nonfinite=True, diverging=False) == "overflow"
    assert not gate.diverged and gate.skipped == {"nonfinite": 3, "overflow": 5, "spike": 1}
    gate.decide(14, nan, nonfinite=True)
    gate.decide(15, nan, nonfinite=True)
    gate.decide(16, math.inf, nonfinite=True, diverging=False)  # neither counts nor breaks the run
    gate.decide(17, nan, nonfinite=True)
    assert gate.diverged
    message = str(gate.divergence("/runs/x/checkpoints/step-00000008"))
    assert message == ("training diverged: 3 consecutive non-finite updates since step 14; "
                       "last good checkpoint: /runs/x/checkpoints/step-00000008")  # fmt: skip
    copy = UpdateGate(SpikeDetector(window=20, k=6.0, warmup=3, max_consecutive=2), max_nonfinite=3)
    copy.load_state_dict(gate.state_dict())
    assert copy.state_dict() == gate.state_dict() and copy.diverged


def test_lr_schedule_warms_up_then_decays_to_zero() -> None:
    assert [lr_factor(s, 4, 20, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, "cosine") == 1.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(1000, 0, 20, "constant") == 1.0


def test_image_grid_rows_and_pixel_values() -> None:
    canvases = [torch.full((3, 3, 4, 4), v) for v in (-1.0, 0.0, 1.0, 2.0)]  # 4 steps x 3 samples
    grid = image_grid(canvases, pad=1)
    assert grid.shape == (4 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype.name == "uint8"
    assert grid[1, 1, 0] == 0 and grid[6, 1, 0] == 128 and grid[11, 1, 0] == 255 and grid[16, 1, 0] == 255
    assert grid[0, 0, 0] == 255  # padding
    with pytest.raises(ValueError, match="row 1"):
        image_grid([torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4)])


def make_checkpoint(root: Path, name: str, complete: bool) -> Path:
    path = RunDir(root).checkpoints / name
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text('{"format": 2, "step": 0, "world_size": 1, "files": {}}')
    return path


def test_only_complete_checkpoints_are_resumed_and_partials_are_cleaned(tmp_path: Path) -> None:
    assert resolve_resume("auto", tmp_path) is None
    make_checkpoint(tmp_path, "step-00000010", complete=True)
    good = make_checkpoint(tmp_path, "step-00000020", complete=True)
    torn = make_checkpoint(tmp_path, "step-00000030", complete=False)
    tmp = make_checkpoint(tmp_path, ".tmp-step-00000040", complete=True)
    assert good == resolve_resume("auto", tmp_path)
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(good), tmp_path) == good
    with pytest.raises(CheckpointError, match="step-00000030 is not a complete checkpoint"):
        resolve_resume(str(torn), tmp_path)
    clean_partial(tmp_path)
    assert not torn.exists() and not tmp.exists() and good.exists()


def test_ema_follows_weights_with_warmed_up_decay() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    decay = min(0.9, 2 / 11)
    torch.testing.assert_close(ema.model.weight, decay * start + (1 - decay) * model.weight.detach())
    assert not any(p.requires_grad for p in ema.model.parameters()) and not ema.model.training
    clone = EMA(model, decay=0.9)
    clone.load_state_dict(ema.state_dict(), ema.updates)
    assert clone.updates == 1 and torch.equal(clone.model.weight, ema.model.weight)
    assert math.isclose(decay, 2 / 11)


def test_the_ema_follows_a_model_that_prepare_moved_to_the_device() -> None:
    """Accelerate and DeepSpeed move the model to the run's device after the EMA copied it there: the
    parameters stay the same objects, the buffers (the iterative VAE's `fold`) become new tensors.
    The meta device stands in for the GPU: an update reading the buffers left behind mixes devices."""
    model = tiny_model("iterative_vae")
    ema = EMA(model, decay=0.9, device="meta")
    model.to("meta")
    ema.follow(model)
    ema.update()
    (_, buffers), (_, shadow) = ema._source, ema._shadow
    assert buffers and all(b.is_meta and b is now for b, now in zip(buffers, model.buffers(), strict=True))
    assert all(s.is_meta for s in shadow) and ema._updates.is_meta


@pytest.mark.parametrize("fused", [False, True])  # decided on the host (apply) / masked on the device
def test_the_torch_update_clips_the_gradients_to_train_grad_clip(fused: bool) -> None:
    """Gradients of norm 15 clipped to 3, then one SGD step of learning rate 1 from zero: the weights
    are minus the clipped gradients, of norm 3 (15 unclipped)."""
    weights = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(1, 3))]
    optimizer = torch.optim.SGD(weights, lr=1.0, fused=fused)
    path = TorchUpdate(None, None, optimizer, clip=3.0, scaler=None)  # type: ignore[arg-type]
    weights[0].grad, weights[1].grad = torch.full((4,), 6.0), torch.full((1, 3), -3 * math.sqrt(3))
    norm = path.grad_norm()
    assert norm.item() == pytest.approx(15.0)
    path.step_masked(torch.tensor(False), torch.tensor(False))
    moved = torch.cat([w.detach().flatten() for w in weights])
    assert moved.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.allclose(moved[:4], torch.full((4,), -1.2)) and all(w.grad is None for w in weights)


def test_the_log_window_keeps_copies_of_the_outputs_a_graph_replay_overwrites() -> None:
    """A captured graph's next replay writes its outputs in place: what the window keeps of the first
    micro-batch must not change with them."""
    code = CodeStats(torch.ones(2, 3), torch.full((3,), 0.5), torch.full((3,), 0.25), "kl")
    out = LossOutput(torch.tensor(2.0), {"bpd": torch.tensor(3.0)}, {"critic": torch.tensor(5.0)}, code)
    window = Window()
    window.add_output(out)
    for t in (out.loss, out.scalars["bpd"], out.aux_losses["critic"], code.mean, code.kl, code.variance):
        t.fill_(100.0)  # the replay
    window.add_output(out)
    sums = {name: value.item() for name, value in window.scalars.items()}
    assert sums == {"loss": 102.0, "bpd": 103.0, "aux/critic": 105.0}
    first = window.codes[0]
    assert first.mean.eq(1.0).all() and first.kl.eq(0.5).all() and first.variance.eq(0.25).all()
    assert window.micro_batches == 2 and window.codes[1].kl.eq(100.0).all()


def test_cuda_graphs_are_refused_without_a_gpu_under_deepspeed_and_with_accumulation() -> None:
    assert cuda_graphs_refusal("cuda", deepspeed=False, accumulate=1) is None
    assert "needs a GPU" in (cuda_graphs_refusal("cpu", deepspeed=False, accumulate=1) or "")
    assert "DeepSpeed" in (cuda_graphs_refusal("cuda", deepspeed=True, accumulate=1) or "")
    refusal = cuda_graphs_refusal("cuda", deepspeed=False, accumulate=3) or ""
    assert "train.accumulate=1 (this run has 3)" in refusal and "train.resize=scale_lr" in refusal


def test_ddp_broadcasts_before_each_forward_only_buffers_a_checkpoint_keeps(tmp_path: Path) -> None:
    """The iterative VAE's `fold` buffers are constants outside its state_dict: no collective per
    forward for them. Running statistics are state: still broadcast."""
    with one_process_group(tmp_path / "store"):
        constants = DDP(tiny_model("iterative_vae"))
        statistics = DDP(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
        assert constants.will_sync_module_buffers() and statistics.will_sync_module_buffers()  # DDP's default
        for wrapped in (constants, statistics):
            spare_buffer_broadcasts(wrapped)
        assert not constants.will_sync_module_buffers()
        assert statistics.will_sync_module_buffers()


def test_side_work_in_preserved_rng_takes_no_draws_from_the_step() -> None:
    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = draws()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with preserved_rng():
        draws()
    assert draws() == expected
