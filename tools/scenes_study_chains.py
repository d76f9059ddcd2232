"""Claim 2 of the scenes study: Markov chains stay on the manifold.

For claim 1's larger-decoder `elbo` and `mmd` PixelVAE runs (their EMA weights; no new training), chains
x -> z ~ q(z | x) -> x ~ p(x | z) from val images and from U(-1, 1) noise, K = 0..8 steps, and
ancestral samples (z ~ p(z)) as the reference row. Per row, against the first N train images: FID
(Inception), the probe's Fréchet distance, its mean confidence and mean on-manifold render error
(dist_vae/metrics/probe.py). Writes RUN/claim2.json per run, OUT/claim2.json, and chain strips
(rows = chains, columns = K) as OUT/pictures/claim2_{run}_{data,noise}.png.

FID at N = FULL["chains"] = 48 (2,048-d features) is biased far upward: read it across rows.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from dist_vae.data.scenes import read_labelled
from dist_vae.files import image_grid, save_png_atomic, to_uint8, write_text_atomic
from dist_vae.metrics.fid import fid
from dist_vae.metrics.inception import load_inception
from dist_vae.metrics.probe import FactorProbe, load_probe, probe_report, to_input
from dist_vae.run_dir import load_run
from dist_vae.sampling import markov_chain, prior_samples

STEPS = 8
STRIP_ROWS = 8
SEED = 0


def scores(
    probe: FactorProbe, extractor: torch.nn.Module, real: torch.Tensor, real_features: torch.Tensor,
    fake: torch.Tensor,
) -> dict[str, float]:  # fmt: skip
    """FID and the probe's verdict of one image set against the reference images."""
    return {"fid": fid(real_features, extractor(to_uint8(fake))), **probe_report(probe, real, fake)}


def chains_of_run(
    run_dir: Path, probe: FactorProbe, real: torch.Tensor, starts: dict[str, torch.Tensor],
    pictures: Path,
) -> dict:  # fmt: skip
    """One run's rows, cached in RUN/claim2.json; writes its chain strips."""
    result_file = run_dir / "claim2.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    model = load_run(run_dir, ema=True).model
    extractor = load_inception()
    real_features = extractor(to_uint8(real))
    generator = torch.Generator().manual_seed(SEED)
    ancestral = prior_samples(model, len(real), generator)[-1]
    result: dict = {"ancestral": scores(probe, extractor, real, real_features, ancestral)}
    for name, start in starts.items():
        chain = markov_chain(model, start, STEPS, generator)
        result[name] = [scores(probe, extractor, real, real_features, x) for x in chain]
        strip = [torch.stack([x[i] for x in chain]) for i in range(min(STRIP_ROWS, len(start)))]
        picture = f"claim2_{run_dir.name.removeprefix('pixelvae_')}_{name}.png"
        save_png_atomic(image_grid(strip), pictures / picture)
    write_text_atomic(result_file, json.dumps(result, indent=2) + "\n")
    return result


def table(results: dict[str, dict]) -> str:
    """Markdown: per run, the ancestral row then every (start, K) row."""
    head = ["reg", "samples", "K", "FID", "probe FD", "confidence", "render error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(reg: str, way: str, k: str, r: dict) -> str:
        cells = [reg, way, k, f"{r['fid']:.1f}", f"{r['probe_fd']:.2f}", f"{r['fake_confidence']:.3f}",
                 f"{r['fake_render_error']:.3f}"]  # fmt: skip
        return "| " + " | ".join(cells) + " |"

    real = next(iter(results.values()))["ancestral"]
    lines.append(
        f"| | train images | | | | {real['real_confidence']:.3f} | {real['real_render_error']:.3f} |"
    )
    for reg, result in results.items():
        lines.append(row(reg, "ancestral", "", result["ancestral"]))
        for way in ("data", "noise"):
            lines.extend(row(reg, f"chain from {way}", str(k), r) for k, r in enumerate(result[way]))
    return "\n".join(lines) + "\n"


def run(out: Path, shards: Path, size: dict, quick: bool, runs: list[str]) -> str:
    """Claim 2 over `runs` (run directories of claim 1 in OUT, side by side); returns the markdown table."""
    n = size["chains"]
    real = to_input(read_labelled(shards, "train", n)[0])
    data = to_input(read_labelled(shards, "val", n)[0])
    noise = torch.rand(data.shape, generator=torch.Generator().manual_seed(SEED)) * 2 - 1
    probe, _ = load_probe(shards)
    pictures = out / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    starts = {"data": data, "noise": noise}
    with ThreadPoolExecutor(len(runs)) as pool:  # one lane per run, as claim 1 trains them
        rows = pool.map(lambda name: chains_of_run(out / name, probe, real, starts, pictures), runs)
    results = dict(zip(runs, rows, strict=True))
    write_text_atomic(out / "claim2.json", json.dumps(results, indent=2) + "\n")
    return table(results)
