"""The built-in default: FedSpa on Synthetic(1, 1), 30 clients, 10 per round, 30 rounds, density 0.5.

    fedspa-jax run                          # same as: fedspa-jax run --config default
    fedspa-jax run --set smoke=true         # 6 clients, 3 rounds

Fast on a laptop CPU (seconds); prints each round's personalized accuracy.
"""

from fedspa_jax.config import Config


def get_config(smoke: bool = False) -> Config:
  config = Config(
      algorithm="fedspa",
      dataset="synthetic",
      model="mlp",
      num_clients=30,
      rounds=30,
      hparams={"density": 0.5, "clients_per_round": 10, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
      data_args={"alpha": 1.0, "beta": 1.0},
      eval_every=1,
      checkpoint_every=10,
  )
  if smoke:
    config.smoke = True
    config.num_clients, config.rounds, config.checkpoint_every = 6, 3, 2
    config.hparams.update(clients_per_round=3, local_epochs=None, local_steps=2, batch_size=8)
    config.data_args.update(max_samples_per_client=60)
    config.model_args = {"hidden": [16]}
  return config
