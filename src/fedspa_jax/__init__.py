"""fedspa-jax: personalized federated learning with personalized sparse masks (FedSpa), in JAX."""

from fedspa_jax import data, models  # noqa: F401

__version__ = "0.1.0"
