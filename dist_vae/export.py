"""`dist-vae export RUN OUT`: a run's weights as a small folder in the Hugging Face Hub's layout.

OUT holds config.json (the model's configuration and resolution, nothing of the optimizer or the
data pipeline), model.safetensors (the EMA weights unless asked otherwise; `dtype="bf16"` halves
them) and README.md, a model card with YAML front matter (the data, the steps, the evaluation's
bits/dim and FID with its N when the run has been evaluated, the newest sample grid as samples.png).
`huggingface_hub`'s folder upload publishes it as is; `dist_vae.load(OUT)` reads it back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dist_vae.checkpoint import EMA_FILE, MODEL_FILE, read_tensors
from dist_vae.files import replace_dir
from dist_vae.pretrained import CONFIG_FILE, WEIGHTS_FILE, model_config_dict
from dist_vae.run_dir import LoadedRun, load_run
from dist_vae.run_layout import RunDir

__all__ = ["DTYPES", "GRID_FILE", "export_run"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRID_FILE = "samples.png"
CARD_FILE = "README.md"


def export_run(run_dir: str | Path, out: str | Path, dtype: str = "fp32", ema: bool | None = True) -> Path:
    """Write the export of `run_dir`'s newest verified checkpoint to `out` (replaced as a whole)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    run = load_run(run_dir, ema=ema)
    source = run.checkpoint / (EMA_FILE if run.ema else MODEL_FILE)
    tensors = {
        name: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).contiguous()
        for name, t in read_tensors(source).items()
    }
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    document = model_config_dict(run.cfg.model, run.cfg.data.resolution)
    document["weights"] = {"ema": run.ema, "dtype": dtype, "step": run.step}
    (tmp / CONFIG_FILE).write_text(json.dumps(document, indent=2) + "\n")
    grids = sorted(RunDir(run_dir).samples.glob("step-*.png"))
    if grids:
        shutil.copyfile(grids[-1], tmp / GRID_FILE)
    (tmp / CARD_FILE).write_text(model_card(run, _evaluation(RunDir(run_dir)), bool(grids), dtype))
    replace_dir(tmp, out)
    return out


def _evaluation(run: RunDir) -> dict[str, Any] | None:
    try:
        return json.loads(run.latest_eval.read_text())
    except (OSError, ValueError):
        return None


def model_card(run: LoadedRun, evaluation: dict[str, Any] | None, grid: bool, dtype: str) -> str:
    """The README.md of an export: Hub front matter, then what trained it and how it scored."""
    cfg = run.cfg
    lines = [
        "---",
        "library_name: dist-vae",
        "pipeline_tag: unconditional-image-generation",
        "tags: [vae, dist-vae, image-generation]",
        "---",
        "",
        f"# {cfg.model.kind} ({cfg.data.resolution} px)",
        "",
        f"- Data: `{cfg.data.path}` at {cfg.data.resolution} px",
        f"- Steps: {run.step} of {cfg.train.steps}, batch {cfg.data.batch_size} per process",
        f"- Weights: {'EMA' if run.ema else 'trained'}, {dtype}",
    ]
    if evaluation is None:
        lines.append("- Evaluation: none yet (`dist-vae evaluate RUN` writes it)")
    else:
        split, step = evaluation.get("split", "?"), evaluation.get("step", "?")
        lines.append(
            f"- Bits/dim ({split}, step {step}): ELBO {evaluation.get('elbo_bpd', float('nan')):.4f}"
            + (f", importance-weighted {evaluation['iw_bpd']:.4f}" if evaluation.get("iw_bpd") else "")
        )
        quality = evaluation.get("sample_quality")
        for way, numbers in (quality or {}).get("ways", {}).items():
            lines.append(f"- FID ({way}, N={numbers.get('n', quality.get('n'))}): {numbers['fid']:.2f}")
    lines += ["", "```python", "import dist_vae", "", 'vae = dist_vae.load("path/to/this/folder")',
              "images = vae.sample(16, seed=0)  # uint8 [16, R, R, 3]", "```", ""]  # fmt: skip
    if grid:
        lines += [f"![samples]({GRID_FILE})", ""]
    return "\n".join(lines)
