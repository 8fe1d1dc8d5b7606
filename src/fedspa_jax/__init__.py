"""fedspa-jax: personalized federated learning with personalized sparse masks (FedSpa), in JAX."""

from fedspa_jax import accounting, algorithms, data, mask_update, masks, models
from fedspa_jax.mask_update import cosine_prune_rate, prune_and_regrow
from fedspa_jax.round import SimState

__version__ = "0.1.0"

__all__ = [
    "SimState",
    "accounting",
    "algorithms",
    "cosine_prune_rate",
    "data",
    "mask_update",
    "masks",
    "models",
    "prune_and_regrow",
]
