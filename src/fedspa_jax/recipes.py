"""Recipes: every method's settings as a published code base runs them, set at once.

    fedspa-jax run --config fashion_mnist_dirichlet --recipe dispfl --algorithm ditto --rounds 100
    fedspa-jax sweep --recipe dispfl --algorithm fedspa --dataset fashion_mnist --model lenet5 --seeds 0 1 2

A recipe is applied after the config file and before the flags and `--set`, which override it. It names config
fields (clients, rounds, the partition) and hyperparameters: those every method shares, then each method's own; a
method the recipe does not cover is an error. Each value cites the file of the code base it comes from, so a
change is deliberate (tests/test_recipes.py holds them against a table).

"dispfl": rong-dai/DisPFL, the public code of FedSpa's authors' group (Dai, Shen, He, Tian, Tao, "DisPFL:
Towards Communication-Efficient Personalized Federated Learning via Decentralized Sparse Training", ICML 2022),
which runs FedSpa's relatives and every baseline on one harness. Paths below are in that repository; `<m>.sh` is
`fedml_experiments/standalone/<m>/cifar10.sh` and `main_<m>.py` its argparse defaults. FedSpa's own code is not
public: its recipe is DisPFL's client procedure under a server (the closest the group's code comes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedspa_jax.config import Config, ConfigError, apply_overrides


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named set of settings.

  Attributes:
    name: what `--recipe` takes.
    description: one line.
    config: config fields (`num_clients`, `rounds`, `partition`, `data.<option>`), as override keys.
    common: hyperparameters every covered method takes (`base.Common`).
    algorithms: per method, its own hyperparameters (they win over `common`).
  """

  name: str
  description: str
  config: dict[str, Any]
  common: dict[str, Any]
  algorithms: dict[str, dict[str, Any]]

  def overrides(self, algorithm: str) -> list[tuple[str, Any]]:
    """The `(key, value)` overrides that set this recipe for `algorithm` (ConfigError for a method it lacks)."""
    if algorithm not in self.algorithms:
      raise ConfigError(f"recipe {self.name!r} has no settings for {algorithm!r}; it covers "
                        f"{', '.join(sorted(self.algorithms))}")
    hparams = {**self.common, **self.algorithms[algorithm]}
    return list(self.config.items()) + [(f"hparams.{k}", v) for k, v in hparams.items()]


DISPFL = Recipe(
    name="dispfl",
    description="rong-dai/DisPFL's scripts and defaults for FedSpa (DisPFL's client), FedAvg(-FT), Ditto, Local, "
                "Sub-FedAvg",
    config={
        "num_clients": 100,  # <m>.sh: --client_num_in_total 100
        "rounds": 500,  # <m>.sh: --comm_round 500
        # <m>.sh: --partition_method 'dir' --partition_alpha 0.3; fedml_api/data_preprocessing/cifar10/
        # data_loader.py ("dir"): a Dir(0.3) class mix per client, equal sizes, test sets by the client's mix
        "partition": "dirichlet_balanced",
        "data.alpha": 0.3,
    },
    common={
        "clients_per_round": 10,  # <m>.sh: --frac 0.1 of 100
        "local_epochs": 5,  # <m>.sh: --epochs 5
        "batch_size": 128,  # <m>.sh: --batch_size 128
        "lr": 0.1,  # <m>.sh: --lr 0.1
        "lr_decay": 0.998,  # <m>.sh: --lr_decay 0.998 (my_model_trainer.py: lr * lr_decay ** round)
        "momentum": 0.0,  # main_<m>.py: --momentum default 0
        "weight_decay": 5e-4,  # main_<m>.py: --wd default 5e-4
        "clip_norm": 10.0,  # fedml_api/standalone/<m>/my_model_trainer.py: clip_grad_norm_(parameters, 10)
    },
    algorithms={
        "fedspa": {
            "density": 0.5,  # DisPFL/cifar10.sh: --dense_ratio 0.5
            # DisPFL/dispfl_api.py: calculate_sparsities(distribution="ERK"), no --uniform (their init_masks floors
            # d * n per layer, ours rounds it: at most one weight per layer apart)
            "density_rule": "erk",
            "alpha": 0.5,  # DisPFL/cifar10.sh: --anneal_factor 0.5
            "regrow": "random",  # DisPFL/cifar10.sh: --dis_gradient_check (regrowth without the gradient)
            "shared_init_mask": False,  # DisPFL/cifar10.sh: --different_initial
            # DisPFL/dispfl_api.py _aggregate_func: each coordinate over the masks that cover it, 1 per client
            "aggregation": "masked_mean",
            "weighting": "uniform",
            # DisPFL/my_model_trainer.py train: clip_grad_norm_ of every parameter's gradient, then param *= mask
            "clip_mode": "dense",
            # DisPFL/dispfl_api.py: masks over get_trainable_params(), every named parameter, biases included
            "masked_leaves": "all",
            "personal_model": "local",  # DisPFL/dispfl_api.py: each client tests the model it just trained
        },
        "fedavg": {
            "weighting": "samples",  # fedavg/fedavg_api.py _aggregate: w_locals weighted by get_sample_number()
        },
        "fedavg_ft": {
            "weighting": "samples",  # as fedavg
            # fedavg/fedavg_api.py train, "Last Fine Tune Round": every client client.train(w_global, -1): args.epochs
            # epochs (5) at lr * lr_decay ** -1
            "finetune_epochs": 5,
            "finetune_lr": 0.1 / 0.998,
        },
        "ditto": {
            "weighting": "samples",  # ditto/ditto_api.py _aggregate: weighted by sample numbers
            "local_epochs": 2,  # ditto/cifar10.sh: --epochs 2 (the global model)
            "personal_epochs": 3,  # ditto/cifar10.sh: --local_epochs 3 (the personal model)
            # ditto/cifar10.sh: --lamda 0.5 (ditto/my_model_trainer.py pulls w -= lr * lamda * (w - w_global) after
            # each clipped step; here the pull's gradient joins the step before clipping)
            "ditto_lambda": 0.5,
        },
        "local": {
            "clients_per_round": 100,  # local/cifar10.sh: --frac 1.0 (every client trains every round)
        },
        "subfedavg": {
            "density": 0.5,  # subavg/cifar10.sh: --dense_ratio 0.5
            "prune_rate": 0.05,  # main_subavg.py: --each_prune_ratio default 0.05
            "distance_threshold": 1e-4,  # main_subavg.py: --dist_thresh default 0.0001
            "accuracy_threshold": 0.5,  # main_subavg.py: --acc_thresh default 0.5
            "clip_mode": "masked",  # subavg/my_model_trainer.py: param.grad *= mask before clip_grad_norm_
            "masked_leaves": "kernels",  # subavg/prune_func.py fake_prune: only "weight" tensors, not "bn"
        },
        # FedRep is not in the group's code: the shared settings above, its own defaults otherwise.
        "fedrep": {},
    },
)

_RECIPES = {r.name: r for r in (DISPFL,)}


def names() -> list[str]:
  """The recipes `get` and `--recipe` take."""
  return sorted(_RECIPES)


def get(name: str) -> Recipe:
  """The recipe called `name` (ConfigError naming the known ones otherwise)."""
  if name not in _RECIPES:
    raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(names())}")
  return _RECIPES[name]


def apply(config: Config, name: str, algorithm: str | None = None) -> Config:
  """`config` with recipe `name`'s settings for `algorithm` (default: the config's own)."""
  return apply_overrides(config, get(name).overrides(algorithm or config.algorithm))
