"""FedSpa on CIFAR-100 split as TFF splits it (500 clients of 100 images by Pachinko allocation), ResNet-18.

    fedspa-jax run --config cifar100_natural --data-dir ~/.tff --out runs/cifar100_natural
    fedspa-jax run --config cifar100_natural --data-dir ~/.tff --set smoke=true   # tiny variant

Reads TFF's `cifar100.sqlite` (or the `cifar100.sqlite.lzma` TFF downloads, decompressed once); see docs/data.md
("Natural datasets"). The files are not downloaded here. `num_clients=0` takes all 500 training clients; a number
takes a seeded subset. Each client's test set is a holdout of `test_fraction` (0.2) of its own images, stratified
by label: TFF's 100 test clients are another population than its 500 training clients (`data.holdout=false` pairs
them by client id instead, which leaves 400 clients without test data). Model and training as the paper-style
CIFAR-100 configs (`cifar100_dirichlet`): ResNet-18, density 0.5, 10 clients per round, 5 local epochs, batch 32,
SGD with momentum 0.9 and learning rate 0.01.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import paper_config


def get_config(smoke: bool = False) -> Config:
  config = paper_config(dataset="cifar100", model="resnet18", partition=None, data_args={"format": "tff"},
                        rounds=500, lr=0.01, smoke=smoke)
  config.num_clients = 4 if smoke else 0  # 0: every TFF client; smoke: 4 of them
  return config
