"""FedSpa on Shakespeare split by speaking role (LEAF's or TFF's files), LEAF's character LSTM.

    fedspa-jax run --config shakespeare_natural --data-dir ~/leaf/data/shakespeare --out runs/shakespeare
    fedspa-jax run --config shakespeare_natural --data-dir ~/tff --set data.format=tff --out runs/shakespeare-tff
    fedspa-jax run --config shakespeare_natural --data-dir ~/leaf/data/shakespeare --set smoke=true  # tiny variant

The files are not downloaded here: see docs/data.md ("Natural datasets") and scripts/prepare_leaf.sh. The task is
the format's (docs/data.md has the table): LEAF's files give LEAF's task, the next character after each
80-character sample (one prediction per sample; `data.per_position=true` scores every position), with LEAF's
vocabulary (82 tokens: padding, LEAF's 80 characters, out-of-vocabulary); TFF's files (`shakespeare.sqlite[.lzma]`
or the older HDF5) give TFF's task, every position of BOS/EOS-wrapped snippets, with TFF's vocabulary (90 tokens).
The model's vocabulary is the data's `num_classes`. LEAF's own setting: SGD with learning rate 0.8, batch 10, one
local epoch, 10 clients per round. `num_clients=0` takes every role in the files.
"""

from fedspa_jax.config import Config
from fedspa_jax.configs._paper import make_smoke


def get_config(smoke: bool = False) -> Config:
  config = Config(
      algorithm="fedspa",
      dataset="shakespeare",
      model="char_lstm",
      num_clients=0,
      rounds=200,
      hparams={"density": 0.5, "clients_per_round": 10, "local_epochs": 1, "batch_size": 10, "lr": 0.8},
      eval_every=5,
      checkpoint_every=25,
      rounds_per_dispatch=5,
  )
  if smoke:
    make_smoke(config)  # 4 roles of the files
  return config
