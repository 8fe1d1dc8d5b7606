"""FedSpa on CIFAR-100, pathological split (10 classes per client), 100 clients, ResNet-18.

    fedspa-jax run --config cifar100_pathological --out runs/cifar100_pathological
    fedspa-jax run --config cifar100_pathological --set smoke=true --out runs/cifar100_pathological-smoke    # tiny variant

Needs the TFDS data prepared (array_record) in --data-dir or ~/tensorflow_datasets; see docs/data.md.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  return paper_config(
      dataset="cifar100",
      model="resnet18",
      partition="pathological",
      data_args={"classes_per_client": 10},
      rounds=500,
      lr=0.01,
      smoke=smoke,
  )
