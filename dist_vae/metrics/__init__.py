"""Numbers that judge a trained model, each taking the model through the `GenerativeModel` protocol."""

from dist_vae.metrics.likelihood import (
    EvalPart,
    accumulate,
    active_units,
    evaluate,
    importance_weighted_log_likelihood,
    laplacian_variance,
    model_mutual_information,
    mutual_information,
    sample_spread,
    summarize,
)

__all__ = [
    "EvalPart",
    "accumulate",
    "active_units",
    "evaluate",
    "importance_weighted_log_likelihood",
    "laplacian_variance",
    "model_mutual_information",
    "mutual_information",
    "sample_spread",
    "summarize",
]
