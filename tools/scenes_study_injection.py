"""Claim 3 of the scenes study: injection sharpens.

Three models of dist_vae/models/iterative_vae.py, trained from configs/demo_scenes.yaml with the
same steps, batch and width, each with 64 latent units in all:
  T8     refine_steps = 8, latent_dims [4, 4] (8 steps x 8 units, each step injects at 8 and 4 px)
  T1     refine_steps = 1, latent_dims [32, 32] (one step, the same ladder and total code size)
  plain  refine_steps = 1, latent_dims [64] (one step, one code at the 4 px bottleneck, no ladder
         injection: the closest this model comes to a plain one-step Gaussian VAE)
Per model, on the EMA weights, for every generation step t (prior samples: the canvas after step t):
  fid         Inception FID against as many val images (metrics/inception.py, metrics/fid.py)
  edge        edge sharpness (metrics/sharpness.py) of the samples on the edges of the scene the
              factor probe reads in them, re-rendered exactly (probe.rerender); 1 = as steep as the
              generator's own edges. `recon_edge`: reconstructions of val images on their true edges.
  spread      the decoder's spread for fixed codes (metrics.sample_spread_per_step): 0 at every step,
              since each step's Gaussian decoder outputs its mean; so also `spread_after`: codes
              z_1..z_t held, z_t+1..z_T drawn afresh, the spread of the final image (how much of the
              picture is still undecided after step t; 0 at t = T by construction).
Writes OUT/claim3.json, OUT/claim3.md and OUT/pictures/claim3_{model}_{ancestral,recon}.png (one row
per step, the data on top).

--quick (16 px, 40 steps, N = 16) proves the stage, not the claim.
Not done: the probe Fréchet distance per step (FID here is Inception's only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_vae.data.scenes import read_labelled
from dist_vae.files import image_grid, save_png_atomic, to_uint8, write_text_atomic
from dist_vae.metrics import sample_spread, sample_spread_per_step
from dist_vae.metrics.fid import fid
from dist_vae.metrics.inception import load_inception
from dist_vae.metrics.probe import load_probe, rerender, to_input
from dist_vae.metrics.sharpness import edge_sharpness
from dist_vae.models.protocol import GenerativeModel, evaluating
from dist_vae.run_dir import load_run
from dist_vae.sampling import prior_samples, reconstructions
from tools.scenes_study_runs import train_run

MODELS = {
    "T8": ["model.refine_steps=8", "model.latent_dims=[4,4]"],
    "T1": ["model.refine_steps=1", "model.latent_dims=[32,32]"],
    "plain": ["model.refine_steps=1", "model.latent_dims=[64]"],
}
SPREAD_CODES, SPREAD_DRAWS = 4, 4


def spread_after(model: GenerativeModel, steps: int, generator: torch.Generator) -> list[float]:
    """Per step t: codes z_1..z_t fixed, the later ones redrawn; the spread of the final images. The
    iterative VAE's code is its steps' codes side by side, so step t owns t/T of its columns."""
    with evaluating(model):
        z = model.prior_sample(SPREAD_CODES, generator)
        held = z.shape[1] // steps
        spreads = []
        for t in range(1, steps + 1):
            draws = []
            for _ in range(SPREAD_DRAWS):
                fresh = model.prior_sample(SPREAD_CODES, generator)
                fresh[:, : t * held] = z[:, : t * held]
                draws.append(model.decode(fresh, generator)[-1])
            spreads.append(sample_spread(torch.stack(draws, dim=1)))
    return spreads


def measure(model: GenerativeModel, data: torch.Tensor, shards: Path) -> dict:
    """Every per-step number of one model against the val images `data`."""
    generator = torch.Generator().manual_seed(0)
    inception, (probe, _) = load_inception(), load_probe(shards)

    def features(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([inception(to_uint8(b)) for b in images.split(32)]).double()

    def edge(images: torch.Tensor) -> float:
        return edge_sharpness(images, rerender(probe, images)[0]).mean().item()

    real = features(data)
    samples = prior_samples(model, len(data), generator)
    recons = reconstructions(model, data, generator)
    with evaluating(model):
        z = model.prior_sample(SPREAD_CODES, generator)
    return {
        "fid": [fid(real, features(s)) for s in samples],
        "edge": [edge(s) for s in samples],
        "data_edge": edge(data),
        "recon_edge": [edge_sharpness(r, data).mean().item() for r in recons],
        "spread": sample_spread_per_step(model, z, SPREAD_DRAWS, generator),
        "spread_after": spread_after(model, len(samples), generator),
        "pictures": {
            "ancestral": [data[:8], *(s[:8] for s in samples)],
            "recon": [data[:8], *(r[:8] for r in recons)],
        },
    }


def run_one(out: Path, shards: Path, size: dict, name: str) -> dict:
    """Train (or resume) one model, then its numbers; cached in RUN/claim3.json."""
    run_dir = out / f"inject_{name}"
    result_file = run_dir / "claim3.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    steps = size["inject_steps"]
    train_run(
        run_dir, "configs/demo_scenes.yaml", shards, size["side"], steps,
        *MODELS[name], f"train.log_every={max(1, steps // 10)}",
    )  # fmt: skip
    model = load_run(run_dir, ema=True).model
    images, _ = read_labelled(shards, "val", size["inject_n"])
    result = measure(model, to_input(images), shards)
    pictures = out / "pictures"
    for kind, rows in result.pop("pictures").items():
        save_png_atomic(image_grid(rows), pictures / f"claim3_{name}_{kind}.png")
    result = {"model": name, **result}
    write_text_atomic(result_file, json.dumps(result, indent=2) + "\n")
    return result


def table(rows: list[dict]) -> str:
    def seq(values: list[float], digits: int) -> str:
        return " ".join(f"{v:.{digits}f}" for v in values)

    head = [
        "model",
        "FID per step",
        "edge sharpness per step (data)",
        "recon edge per step",
        "spread \\| spread after t",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["model"], seq(r["fid"], 0), f"{seq(r['edge'], 2)} ({r['data_edge']:.2f})",
            seq(r["recon_edge"], 2),
            f"{seq(r['spread'], 3)} \\| {seq(r['spread_after'], 3)}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(out: Path, shards: Path, size: dict, quick: bool) -> str:
    """Claim 3 end to end (runs one after another; `quick` only picks the sizes); the markdown table."""
    rows = [run_one(out, shards, size, name) for name in MODELS]
    write_text_atomic(out / "claim3.json", json.dumps(rows, indent=2) + "\n")
    text = table(rows)
    write_text_atomic(out / "claim3.md", text)
    return text
