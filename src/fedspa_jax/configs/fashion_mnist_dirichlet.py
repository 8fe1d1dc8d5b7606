"""FedSpa on Fashion-MNIST, Dirichlet(0.3) split, 100 clients, LeNet-5.

    fedspa-jax run --config fashion_mnist_dirichlet --out runs/fashion_mnist_dirichlet
    fedspa-jax run --config fashion_mnist_dirichlet --set smoke=true --out runs/fashion_mnist_dirichlet-smoke    # tiny variant

Fashion-MNIST from its IDX files (Debian's dataset-fashion-mnist, or downloaded); see docs/data.md.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  return paper_config(
      dataset="fashion_mnist",
      model="lenet5",
      partition="dirichlet",
      data_args={"alpha": 0.3},
      rounds=200,
      lr=0.01,
      smoke=smoke,
  )
