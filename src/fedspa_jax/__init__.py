"""fedspa-jax: personalized federated learning with personalized sparse masks (FedSpa), in JAX."""

from fedspa_jax import accounting, algorithms, data, mask_update, masks, models  # noqa: F401
from fedspa_jax.mask_update import cosine_prune_rate, prune_and_regrow  # noqa: F401
from fedspa_jax.round import SimState  # noqa: F401

__version__ = "0.1.0"
