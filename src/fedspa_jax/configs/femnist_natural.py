"""FedSpa on FEMNIST split by writer (LEAF's or TFF's files), every writer in the files a client, FedAvg's CNN.

    fedspa-jax run --config femnist_natural --data-dir ~/leaf/data/femnist --out runs/femnist
    fedspa-jax run --config femnist_natural --data-dir ~/.tff --set data.format=tff --out runs/femnist-tff
    fedspa-jax run --config femnist_natural --data-dir ~/leaf/data/femnist --set smoke=true   # tiny variant

The files are not downloaded here: see docs/data.md ("Natural datasets") and scripts/prepare_leaf.sh.
`num_clients=0` takes every writer the files hold (TFF's full files: 3,400); a number takes a seeded subset.
Data options: `data.format` (leaf/tff: TFF's `emnist_all.sqlite[.lzma]` or its older HDF5 files),
`data.min_samples`, `data.client_fraction`, `data.sample_fraction` (whole writers until that share of the samples),
`data.only_digits` (TFF's digits-only splits, 10 classes).
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import make_smoke


def get_config(smoke: bool = False) -> Config:
  config = Config(
      algorithm="fedspa",
      dataset="femnist",
      model="cnn",
      num_clients=0,
      rounds=200,
      hparams={"density": 0.5, "clients_per_round": 10, "local_epochs": 1, "batch_size": 20, "lr": 0.05,
               "momentum": 0.0},
      eval_every=5,
      checkpoint_every=25,
      rounds_per_dispatch=5,
  )
  if smoke:
    make_smoke(config)  # 4 writers of the files
  return config
