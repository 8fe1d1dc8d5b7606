"""FedSpa on CIFAR-100, Dirichlet(0.3) split, 100 clients, ResNet-18.

    fedspa-jax run --config cifar100_dirichlet --out runs/cifar100_dirichlet
    fedspa-jax run --config cifar100_dirichlet --set smoke=true --out runs/cifar100_dirichlet-smoke    # tiny variant

Needs the TFDS data prepared (array_record) in --data-dir or ~/tensorflow_datasets; see docs/data.md.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  return paper_config(
      dataset="cifar100",
      model="resnet18",
      partition="dirichlet",
      data_args={"alpha": 0.3},
      rounds=500,
      lr=0.01,
      smoke=smoke,
  )
