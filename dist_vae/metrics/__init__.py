"""Numbers that judge a trained model, each taking the model through the `GenerativeModel` protocol.

The package re-exports likelihood.py's names (its `__all__`); sample quality (FID and the factor
probe) lives in its own modules, imported by name, since it needs the `[metrics]` extra.
"""

from dist_vae.metrics.likelihood import *  # noqa: F403
from dist_vae.metrics.likelihood import __all__ as __all__
