"""FedSpa on CIFAR-10, pathological split (2 classes per client), 100 clients, the LG-FedAvg/FedRep CNN.

    fedspa-jax run --config cifar10_pathological --out runs/cifar10_pathological
    fedspa-jax run --config cifar10_pathological --set smoke=true --out runs/cifar10_pathological-smoke    # tiny variant

Needs the TFDS data prepared (array_record) in --data-dir or ~/tensorflow_datasets; see docs/data.md.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  return paper_config(
      dataset="cifar10",
      model="cifar_cnn",
      partition="pathological",
      data_args={"classes_per_client": 2},
      rounds=500,
      lr=0.01,
      smoke=smoke,
  )
