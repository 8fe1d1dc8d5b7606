"""Recipes (issue 28): the DisPFL group's settings, held against a table written from its files, and --recipe."""

import pytest

import fedspa_jax as fj
from fedspa_jax import cli, recipes
from fedspa_jax import config as config_lib
from fedspa_jax.config import ConfigError

# Read off rong-dai/DisPFL by hand: fedml_experiments/standalone/<m>/cifar10.sh, main_<m>.py's argparse defaults and
# fedml_api/standalone/<m>/{my_model_trainer.py, <m>_api.py}. A change to the recipe must change this table too.
SHARED = {"clients_per_round": 10, "local_epochs": 5, "batch_size": 128, "lr": 0.1, "lr_decay": 0.998,
          "momentum": 0.0, "weight_decay": 0.0005, "clip_norm": 10.0}
TABLE = {
    "fedspa": {**SHARED, "density": 0.5, "density_rule": "erk", "alpha": 0.5, "regrow": "random",
               "shared_init_mask": False, "aggregation": "masked_mean", "weighting": "uniform", "clip_mode": "dense",
               "masked_leaves": "all", "personal_model": "local"},
    "fedavg": {**SHARED, "weighting": "samples"},
    "fedavg_ft": {**SHARED, "weighting": "samples", "finetune_epochs": 5, "finetune_lr": 0.1 / 0.998},
    "ditto": {**SHARED, "weighting": "samples", "local_epochs": 2, "personal_epochs": 3, "ditto_lambda": 0.5},
    "local": {**SHARED, "clients_per_round": 100},
    "subfedavg": {**SHARED, "density": 0.5, "prune_rate": 0.05, "distance_threshold": 0.0001,
                  "accuracy_threshold": 0.5, "clip_mode": "masked", "masked_leaves": "kernels"},
    "fedrep": SHARED,
}
CONFIG = {"num_clients": 100, "rounds": 500, "partition": "dirichlet_balanced", "data_args": {"alpha": 0.3}}


@pytest.mark.parametrize("algorithm", sorted(TABLE))
def test_dispfl_recipe_matches_the_table(algorithm):
  base = fj.config.load("default")
  config = recipes.apply(base, "dispfl", algorithm)
  assert {k: config.hparams[k] for k in TABLE[algorithm]} == TABLE[algorithm]
  assert set(config.hparams) - set(base.hparams) <= set(TABLE[algorithm])  # nothing the table does not hold
  for key, value in CONFIG.items():
    assert getattr(config, key) == value
  fj.algorithms.check_hparam_types(algorithm, {k: config.hparams[k] for k in TABLE[algorithm]})


def test_every_recipe_value_builds_its_algorithm():
  model = fj.models.get("mlp", num_classes=3, hidden=(4,))
  for algorithm, hparams in TABLE.items():
    algo = fj.algorithms.get(algorithm, model=model, **{**hparams, "rounds": 500})
    assert {k: algo.hparams[k] for k in hparams} == hparams


def test_unknown_recipes_and_methods_are_clear_errors():
  with pytest.raises(ConfigError, match="unknown recipe 'fedml'; known: dispfl"):
    recipes.get("fedml")
  with pytest.raises(ConfigError, match="recipe 'dispfl' has no settings for 'fedper'"):
    recipes.get("dispfl").overrides("fedper")


def test_cli_recipe_sits_between_the_config_and_the_flags():
  args = cli.make_parser().parse_args(["run", "--recipe", "dispfl", "--algorithm", "ditto", "--rounds", "7",
                                       "--set", "ditto_lambda=0.25"])
  config, _ = cli.resolve_config(args)
  assert config.algorithm == "ditto" and config.rounds == 7  # the flag wins over the recipe's 500
  assert config.hparams["ditto_lambda"] == 0.25 and config.hparams["personal_epochs"] == 3
  assert config.partition == "dirichlet_balanced" and config.data_args == {"alpha": 0.3}
  args = cli.make_parser().parse_args(["run", "--recipe", "dispfl", "--algorithm", "fedper"])
  with pytest.raises(ConfigError, match="no settings for 'fedper'"):
    cli.resolve_config(args)


@pytest.mark.parametrize("algorithm", ["fedspa", "local"])
def test_a_smoke_run_keeps_its_size_under_a_recipe(algorithm):
  args = cli.make_parser().parse_args(["run", "--recipe", "dispfl", "--algorithm", algorithm, "--config",
                                       "fashion_mnist_dirichlet", "--set", "smoke=true"])
  config, _ = cli.resolve_config(args)
  smoke = config_lib.load("fashion_mnist_dirichlet", smoke=True)
  assert (config.num_clients, config.rounds) == (smoke.num_clients, smoke.rounds)  # not the recipe's 100 and 500
  assert config.partition == "dirichlet_balanced" and config.hparams["lr_decay"] == 0.998  # the method's settings
  every = smoke.num_clients if algorithm == "local" else smoke.hparams["clients_per_round"]
  assert config.hparams["clients_per_round"] == every  # Local trains every client, as the recipe does


def test_study_units_run_each_method_at_the_recipe():
  from script_loader import load

  study = load("study_recipe")
  units = study.units("full")
  assert len(units) == 2 * 6 * 3  # 2 splits x 6 runs (FedAvg's gives FedAvg-FT too) x 3 seeds
  for unit in units:
    config = study.unit_config(unit, "full")
    algorithm = study.METHODS[unit.method][0]
    table = TABLE[algorithm] if unit.method != "fedavg" else {**TABLE["fedavg"], "finetune_lr": 0.1 / 0.998}
    assert {k: config.hparams[k] for k in table} == table
    assert (config.rounds, config.num_clients, config.seed, config.dataset, config.model) == (
        100, 100, unit.seed, "fashion_mnist", "lenet5")
    assert config.partition == {"balanced": "dirichlet_balanced", "dirichlet": "dirichlet"}[unit.split]
    assert config.data_args == {"alpha": 0.3}
    assert config.eval_finetune_epochs == (5 if unit.method == "fedavg" else 0)


def test_study_refresh_rewrites_records_from_the_run_folders(tmp_path):
  """The tiny tier runs FedAvg's two units (2 rounds each) as the study does; --refresh then rebuilds the records
  from the summary.json files those runs wrote, e.g. after a field (here eval_flops) was added to the records."""
  import json

  from script_loader import load

  study = load("study_recipe")
  out, results = tmp_path / "runs", tmp_path / "results.json"
  args = ["--tier", "tiny", "--only", "fedavg", "--out", str(out), "--results", str(results)]
  assert study.main(args) == 0
  written = json.loads(results.read_text())["records"]
  assert sorted((r["split"], r["method"]) for r in written) == [
      ("balanced", "FedAvg, w"), ("balanced", "FedAvg-FT"), ("dirichlet", "FedAvg, w"), ("dirichlet", "FedAvg-FT")]
  summary = json.loads((out / "rounds2" / "balanced" / "fedavg" / "seed1" / "summary.json").read_text())
  ft = next(r for r in written if (r["split"], r["method"]) == ("balanced", "FedAvg-FT"))
  assert (ft["accuracy"], ft["eval_flops"], ft["rounds"]) == (
      summary["final_accuracy_finetuned"]["mean"], summary["eval_flops"], 2)
  stripped = [{k: v for k, v in r.items() if k != "eval_flops"} for r in written]
  results.write_text(json.dumps({"records": stripped}))
  assert study.main(args + ["--refresh"]) == 0
  assert sorted(json.loads(results.read_text())["records"], key=str) == sorted(written, key=str)


def test_study_shards_split_the_units_between_jobs(capsys, tmp_path):
  from script_loader import load

  study = load("study_recipe")
  listed = []
  for shard in ("0/2", "1/2"):
    assert study.main(["--only", "local", "fedrep", "--shard", shard, "--list", "--results",
                       str(tmp_path / "none.json")]) == 0
    listed.append([line.split()[1] for line in capsys.readouterr().out.splitlines()])
  # two jobs never share a unit, and together they hold all 12 (2 methods x 2 splits x 3 seeds), each todo
  assert not set(listed[0]) & set(listed[1]) and len(listed[0]) == len(listed[1]) == 6
  assert sorted(listed[0] + listed[1]) == sorted(u.name for u in study.units("full") if u.method in ("local", "fedrep"))
  with pytest.raises(SystemExit):
    study.main(["--shard", "2/2", "--list"])
