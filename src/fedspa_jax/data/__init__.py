"""Federated datasets: sources, partitioners and the flat, static-shape `FederatedData` the engine consumes.

    data = fedspa_jax.data.load("fashion_mnist", num_clients=100, partition="pathological", classes_per_client=2)
    print(fedspa_jax.data.format_summary(data))

See docs/data.md.
"""

from fedspa_jax.data.build import channel_stats, from_arrays, from_clients
from fedspa_jax.data.cache import cache_dir
from fedspa_jax.data.federated import ClientSplit, FederatedData, split_from_flat, stack_clients, take_clients
from fedspa_jax.data.holdout import draw_global, split_local
from fedspa_jax.data.idx import read_idx, write_idx
from fedspa_jax.data import text
from fedspa_jax.data.loader import dataset_names, load, load_arrays
from fedspa_jax.data.natural import load_natural
from fedspa_jax.data.natural_formats import DataFormatError
from fedspa_jax.data.partitioners import PARTITIONERS, dirichlet, iid, partition, pathological
from fedspa_jax.data.summary import client_label_counts, format_summary, plot_label_histogram, summarize
from fedspa_jax.data.synthetic import synthetic

__all__ = [
    "ClientSplit",
    "DataFormatError",
    "FederatedData",
    "PARTITIONERS",
    "cache_dir",
    "channel_stats",
    "client_label_counts",
    "dataset_names",
    "dirichlet",
    "draw_global",
    "format_summary",
    "from_arrays",
    "from_clients",
    "iid",
    "load",
    "load_arrays",
    "load_natural",
    "partition",
    "pathological",
    "plot_label_histogram",
    "read_idx",
    "split_from_flat",
    "split_local",
    "stack_clients",
    "summarize",
    "synthetic",
    "take_clients",
    "text",
    "write_idx",
]
