"""FedSpa on Fashion-MNIST, pathological split (2 classes per client), 100 clients, LeNet-5.

    fedspa-jax run --config fashion_mnist_pathological --out runs/fashion_mnist_pathological
    fedspa-jax run --config fashion_mnist_pathological --set smoke=true --out runs/fashion_mnist_pathological-smoke    # tiny variant

Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist, or downloaded); see docs/data.md.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  return paper_config(
      dataset="fashion_mnist",
      model="lenet5",
      partition="pathological",
      data_args={"classes_per_client": 2},
      rounds=200,
      lr=0.01,
      smoke=smoke,
  )
