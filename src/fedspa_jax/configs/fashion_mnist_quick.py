"""The README's main job: FedSpa on real Fashion-MNIST, 100 clients with 2 classes each, LeNet-5, 30 rounds.

    bash scripts/run.sh                                  # installs the data if it can, then runs this config
    fedspa-jax run --config fashion_mnist_quick          # the same, once the data are there
    fedspa-jax run --config fashion_mnist_quick --set smoke=true

A short version of `fashion_mnist_pathological` (1 local epoch of plain SGD instead of 5 with momentum, 30 rounds
instead of 200) that finishes in about a minute on a 2-core CPU and prints personalized accuracy every round.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  config = paper_config(
      dataset="fashion_mnist",
      model="lenet5",
      partition="pathological",
      data_args={"classes_per_client": 2},
      rounds=30,
      lr=0.05,
      smoke=smoke,
  )
  if not smoke:
    config.hparams.update(local_epochs=1, momentum=0.0)
    config.eval_every, config.checkpoint_every, config.rounds_per_dispatch = 1, 10, 1
  return config
