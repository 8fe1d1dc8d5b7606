"""Shared shape of the paper-style configs (FedSpa's benchmark setting: 100 clients, 10% per round, density 0.5).

The paper's text beyond its abstract is not at hand; these follow common personalized-FL practice (FedAvg's
pathological split, Dirichlet(0.3), 100 clients, 10 sampled per round, 5 local epochs, batch 32, SGD) and are
starting points, not a reproduction claim. Every value can be changed with `--set`.
"""

from fedspa_jax.config import Config


def paper_config(*, dataset: str, model: str, partition: str, data_args: dict, rounds: int, lr: float,
                 smoke: bool) -> Config:
  config = Config(
      algorithm="fedspa",
      dataset=dataset,
      model=model,
      num_clients=100,
      rounds=rounds,
      partition=partition,
      hparams={"density": 0.5, "clients_per_round": 10, "local_epochs": 5, "batch_size": 32, "lr": lr,
               "momentum": 0.9},
      data_args=dict(data_args),
      eval_every=5,
      checkpoint_every=25,
      rounds_per_dispatch=5,
  )
  if smoke:
    make_smoke(config)  # the same data, model and partition
    if partition == "dirichlet":
      config.data_args["min_samples"] = 10
  return config


def make_smoke(config: Config) -> None:
  """Turns `config` into its tiny variant, in place: 4 clients, 2 per round, 2 rounds of 2 local steps at batch 8,
  one evaluation."""
  config.smoke = True
  config.num_clients, config.rounds = 4, 2
  config.eval_every, config.checkpoint_every, config.rounds_per_dispatch = 2, 1, 1
  config.hparams.update(clients_per_round=2, local_epochs=None, local_steps=2, batch_size=8)
