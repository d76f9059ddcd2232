"""Sample quality at `eval.fid_every` steps: the trainer's one call (and its check at start-up).

The trainer passes the model it evaluates (the EMA weights when kept); every rank generates and
embeds its share of `eval.fid_samples` prior samples, the reference features come from the cache
(reference.py), and the main process computes the numbers it logs.
"""

from __future__ import annotations

import torch

from dist_vae.data.config import DataConfig
from dist_vae.data.stream import ShardStream
from dist_vae.distributed import world
from dist_vae.errors import ConfigError
from dist_vae.metrics.inception import load_inception, require_libraries, verify, weights_path
from dist_vae.metrics.settings import EvalConfig
from dist_vae.models.protocol import GenerativeModel
from dist_vae.precision import autocast_dtype

LOGGED = {"fid": "eval/fid", "kid": "eval/kid", "precision": "eval/precision", "recall": "eval/recall"}


def check_fid_ready(settings: EvalConfig, data: DataConfig) -> None:
    """Refuse at start-up, not at the first evaluation: the `[metrics]` extra, the weights file (and
    its sha256), and a split with at least eval.fid_samples images (MetricsUnavailable, DataError)."""
    require_libraries()
    verify(weights_path(settings.inception))
    total = ShardStream(data, settings.fid_split, batch_size=1, training=False).total
    if total < settings.fid_samples:
        raise ConfigError(
            f"eval.fid_samples={settings.fid_samples} but split {settings.fid_split!r} of {data.path} "
            f"has {total} images: lower it or use another eval.fid_split"
        )


@torch.no_grad()
def fid_during_training(
    model: GenerativeModel,
    settings: EvalConfig,
    data: DataConfig,
    step: int,
    device: torch.device,
    *,
    seed: int,
    precision: str,
) -> dict[str, float]:
    """eval/fid, eval/kid, eval/precision, eval/recall of N prior samples against N split images;
    `seed` is the run's, `precision` its train.precision (the samples' autocast).

    Collective: every rank must call it. The numbers are the main process's; other ranks get {}.
    """
    # The [metrics] libraries load only here: a run with eval.fid_every=0 trains without them.
    from dist_vae.metrics.embed import embed_generated
    from dist_vae.metrics.fid import sample_quality
    from dist_vae.metrics.generated import prior_way
    from dist_vae.metrics.reference import reference_features

    e = settings
    extractor = load_inception(e.inception, device)
    reference = reference_features(data, e.fid_split, e.fid_samples, extractor, e.batch_size)
    generate = prior_way(model, seed + step, autocast_dtype(precision))
    (fake,) = embed_generated(extractor, e.fid_samples, e.batch_size, lambda chunk: generate(chunk)[-1:])
    if world()[0] != 0:
        return {}
    quality = sample_quality(reference.features, fake, e, seed=seed)
    return {tag: quality[name] for name, tag in LOGGED.items()}
