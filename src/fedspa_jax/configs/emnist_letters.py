"""FedSpa on EMNIST-Letters (26 classes), Dirichlet(0.3) split, 100 clients, FedAvg's CNN.

    fedspa-jax run --config emnist_letters --out runs/emnist_letters
    fedspa-jax run --config emnist_letters --set smoke=true --out runs/emnist_letters-smoke    # tiny variant

Needs the TFDS data prepared (array_record) in --data-dir or ~/tensorflow_datasets; see docs/data.md.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  return paper_config(
      dataset="emnist_letters",
      model="cnn",
      partition="dirichlet",
      data_args={"alpha": 0.3},
      rounds=200,
      lr=0.01,
      smoke=smoke,
  )
