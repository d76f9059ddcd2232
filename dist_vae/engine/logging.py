"""Rank-0 outputs: TensorBoard scalars and images, PNG sample grids, the progress bar.

Other ranks get a `RunLogger(enabled=False)` whose methods do nothing, so the trainer never
branches on the rank to log.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from dist_vae.files import image_grid, save_png_atomic


class RunLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.samples_dir = run_dir / "samples"
        self.tensorboard_dir = run_dir / "tensorboard"
        self._writer = None
        self._bar = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir))
            if start_step < total_steps:  # a finished run says so in one line, not with a full bar
                self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)

    def progress(self, step: int, bpd: float | None) -> None:
        """Advance the bar to `step`; `bpd`: the training bits/dim of the last window, when logged."""
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if bpd is not None:
            self._bar.set_postfix(bpd=f"{bpd:.4g}", refresh=False)

    def line(self, text: str) -> None:
        """One line on stderr that does not tear the progress bar."""
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def samples(self, rows: Sequence[torch.Tensor], step: int) -> None:
        if self._writer is None:
            return
        grid = image_grid(rows)
        save_png_atomic(grid, self.samples_dir / f"step-{step:08d}.png")
        self._writer.add_image("samples", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._bar is not None:
            self._bar.close()
