"""FedSpa on CIFAR-10, Dirichlet(0.3) split, 100 clients, the LG-FedAvg/FedRep CNN.

    fedspa-jax run --config cifar10_dirichlet --out runs/cifar10_dirichlet
    fedspa-jax run --config cifar10_dirichlet --set smoke=true --out runs/cifar10_dirichlet-smoke    # tiny variant

Needs the TFDS data prepared (array_record) in --data-dir or ~/tensorflow_datasets; see docs/data.md.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  return paper_config(
      dataset="cifar10",
      model="cifar_cnn",
      partition="dirichlet",
      data_args={"alpha": 0.3},
      rounds=500,
      lr=0.01,
      smoke=smoke,
  )
