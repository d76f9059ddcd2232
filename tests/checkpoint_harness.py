"""Saves or loads a checkpoint of a tiny model and AdamW under whatever `accelerate launch` set up
(DDP over gloo, DeepSpeed ZeRO-1/2 on CPU, or one process): tests/test_checkpoint_elastic.py.

    checkpoint_harness.py save RUN_DIR   train 3 steps (per-rank data), save step 3
    checkpoint_harness.py load RUN_DIR   load step 3, save it again as step 4 (gathered from this
                                         world size's partitions), then take one more step
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedType, InitProcessGroupKwargs  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

from dist_vae.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint  # noqa: E402
from dist_vae.engine.backend import EMA  # noqa: E402
from dist_vae.run_layout import RunDir  # noqa: E402


def tiny_model() -> nn.Module:
    torch.manual_seed(0)  # odd sizes: ZeRO partitions split parameters between ranks
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def main(mode: str, run_dir: Path) -> None:
    acc = Accelerator(cpu=os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true",
                      kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])  # fmt: skip
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        ds.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=1, gradient_clipping=1.0)
    model = tiny_model()
    head, tail = list(model[0].parameters()), [p for layer in model[2:] for p in layer.parameters()]
    groups = [{"params": head, "lr": 1e-2}, {"params": tail, "lr": 3e-3, "weight_decay": 0.1}]
    model, optimizer = acc.prepare(model, torch.optim.AdamW(groups, betas=(0.8, 0.95)))
    raw = acc.unwrap_model(model) if acc.distributed_type != DistributedType.DEEPSPEED else model.module
    ema = EMA(raw, 0.9)
    meta = {"saved_by": acc.num_processes, "dtype": str(next(raw.parameters()).dtype)}
    first = 0
    if mode == "load":
        loaded = load_checkpoint(
            acc, RunDir(run_dir).checkpoint(3), model=model, optimizer=optimizer, ema=ema
        )
        assert loaded.step == 3 and loaded.world_size == 2 and loaded.meta["saved_by"] == 2
        weights = load_file(RunDir(run_dir).checkpoint(3) / MODEL_FILE)
        assert all(
            torch.equal(value, weights[name].to(value.dtype)) for name, value in raw.state_dict().items()
        )
        save_checkpoint(acc, run_dir, 4, model=model, optimizer=optimizer, ema=ema, scaler_state=None,
                        meta=meta, keep=10)  # fmt: skip
        first = 3
    for step in range(first, 3 if mode == "save" else 4):
        generator = torch.Generator().manual_seed(100 * step + acc.process_index)
        x = torch.randn(4, 7, generator=generator)
        loss = model(x.to(next(raw.parameters()).dtype)).float().square().mean()
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        assert torch.isfinite(loss)
    if mode == "save":
        save_checkpoint(acc, run_dir, 3, model=model, optimizer=optimizer, ema=ema, scaler_state=None,
                        meta=meta, keep=10)  # fmt: skip
    acc.wait_for_everyone()
    # Let go of DDP's reducer and DeepSpeed's engine, which hold the process group, before destroying
    # it: a gloo group whose worker threads live on into interpreter shutdown can abort the finished
    # process ("terminate called without an active exception", SIGABRT), seen once in 3 full runs.
    del model, optimizer, raw, ema
    acc.free_memory()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
