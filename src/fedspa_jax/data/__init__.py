"""Federated datasets: sources, partitioners and the padded static-shape `FederatedData` the engine consumes."""

from fedspa_jax.data.federated import ClientSplit, FederatedData, pad_clients
from fedspa_jax.data.synthetic import synthetic

__all__ = ["ClientSplit", "FederatedData", "pad_clients", "synthetic"]
