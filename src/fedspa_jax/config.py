"""What one experiment is: a `Config`, loaded from a Python config file and edited with `key=value` overrides.

Config files are plain Python with a `get_config(smoke=False) -> Config` function (the ml_collections habit,
without ml_collections); `smoke=True` gives the tiny variant that tests and first tries run. The files shipped with
the library live in `fedspa_jax/configs/` and are named by their module name (`"cifar10_dirichlet"`); any other
file is named by its path.

Overrides are `key=value` strings: a top-level field (`rounds=50`, `partition=dirichlet`), an entry of one of the
dict fields (`hparams.density=0.2`, `data.alpha=0.3`, `model.hidden=[64]`), or a bare name that is not a field,
which is taken as an algorithm hyperparameter (`density=0.2`, as in `fedspa-jax run --set density=0.2`). Values
are JSON when they parse (numbers, true/false, null, lists, dicts), else strings. Changing `dataset` or `partition`
drops the config's data options (they belong to the old data).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import pathlib
from typing import Any

# Fields that do not change the trajectory of a run: a run may be resumed with different values of these.
RESUMABLE_FIELDS = ("eval_every", "eval_clients", "eval_finetune_epochs", "checkpoint_every", "keep_checkpoints", "rounds_per_dispatch", "data_dir",
                    "shard_clients")
# config.json also records the algorithm's resolved hyperparameters under this key; reading a config back drops it.
RESOLVED_KEY = "algorithm_hparams"
DICT_FIELDS = {"hparams": "hparams", "data": "data_args", "data_args": "data_args", "model": "model_args",
               "model_args": "model_args"}
_INT_FIELDS = {"num_clients": 0, "rounds": 1, "eval_every": 1, "checkpoint_every": 0, "keep_checkpoints": 1,
               "rounds_per_dispatch": 1, "seed": None, "eval_finetune_epochs": 0}
_STR_FIELDS = ("algorithm", "dataset", "model")
_OPTIONAL_STR_FIELDS = ("partition", "data_dir")


class ConfigError(ValueError):
  """Bad input (config, names, arguments, run folder), found before anything is compiled."""


@dataclasses.dataclass
class Config:
  """One experiment.

  Attributes:
    algorithm: registry name (`fedspa_jax.algorithms.names()`).
    dataset: dataset name (`fedspa_jax.data.dataset_names()`).
    model: model name (`fedspa_jax.models.names()`).
    num_clients: K; for the natural datasets (femnist, shakespeare) 0 means every user in the files and K a seeded
      subset of K users (the partitioned datasets need K >= 1).
    rounds: federated rounds T.
    partition: partitioner ("pathological", "dirichlet", "iid"); None for datasets with their own split.
    seed: seeds the partition, the model init, the masks and every round's randomness.
    hparams: the algorithm's hyperparameters (`rounds` is added when the algorithm takes it).
    data_args: options of the data source / partitioner (`classes_per_client`, `alpha`, ...).
    model_args: options of the model constructor.
    eval_every: evaluate every this many rounds (and after the last).
    eval_clients: evaluate a seeded sample of this many clients at the periodic evaluations (None: all K); the
      final evaluation always covers all clients. metrics.jsonl records how many were evaluated.
    eval_finetune_epochs: E > 0 also scores every client, at the final evaluation, after E local epochs of
      fine-tuning from the model it is scored with (the local-adaptation protocol, the same for every method;
      `fedspa_jax.evaluation`), reported beside the method's own protocol as `final_accuracy_finetuned`.
    checkpoint_every: checkpoint every this many rounds (0: only at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    rounds_per_dispatch: rounds fused into one compiled call (lax.scan) between evaluations and checkpoints.
    data_dir: where the data source looks first.
    shard_clients: shard the client population (store and data) over all devices, a "clients" mesh; results equal
      one device's for the same `hparams.cohort_sampling` (docs/scaling.md).
    smoke: this is the config file's tiny variant.
  """

  algorithm: str
  dataset: str
  model: str
  num_clients: int
  rounds: int
  partition: str | None = None
  seed: int = 0
  hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
  data_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  eval_every: int = 1
  eval_clients: int | None = None
  eval_finetune_epochs: int = 0
  checkpoint_every: int = 10
  keep_checkpoints: int = 2
  rounds_per_dispatch: int = 1
  data_dir: str | None = None
  shard_clients: bool = False
  smoke: bool = False

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict (a JSON round trip, so tuples come back as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    d = {k: v for k, v in d.items() if k != RESOLVED_KEY}  # a run's record, not an input
    unknown = sorted(set(d) - set(field_names()))
    if unknown:
      raise ConfigError(f"unknown config keys {', '.join(unknown)}; known: {', '.join(field_names())}")
    return cls(**d)


def field_names() -> list[str]:
  return [f.name for f in dataclasses.fields(Config)]


def parse_value(text: str) -> Any:
  """An override's value: JSON when it parses (numbers, true/false, null, lists, dicts), else the string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def split_override(item: str) -> tuple[str, Any]:
  """`"key=value"` -> (key, parsed value)."""
  key, sep, value = item.partition("=")
  if not sep or not key.strip():
    raise ConfigError(f"overrides are KEY=VALUE, got {item!r}")
  return key.strip(), parse_value(value)


def apply_overrides(config: Config, overrides: list[tuple[str, Any]] | dict[str, Any]) -> Config:
  """A copy of `config` with `(key, value)` overrides applied (see the module docstring for the keys).

  Data options belong to a dataset and partition: an override that changes `dataset` or `partition` drops the
  config's `data_args` first (whatever the order of the overrides), so only the `data.*` overrides given apply.

  Raises:
    ConfigError: a dotted key whose prefix is not a dict field (listing the fields).
  """
  config = dataclasses.replace(
      config, hparams=dict(config.hparams), data_args=dict(config.data_args), model_args=dict(config.model_args)
  )
  items = list(overrides.items() if isinstance(overrides, dict) else overrides)
  data_keys = ("dataset", "partition")
  if any(key in data_keys and value != getattr(config, key) for key, value in items):
    config.data_args = {}
  for key, value in sorted(items, key=lambda item: item[0] not in data_keys):  # stable: data keys first
    if "." in key:
      prefix, name = key.split(".", 1)
      if prefix not in DICT_FIELDS:
        raise ConfigError(
            f"unknown config key {key!r}: {prefix!r} is not one of the dict fields {', '.join(sorted(DICT_FIELDS))}; "
            f"top-level keys: {', '.join(field_names())}"
        )
      getattr(config, DICT_FIELDS[prefix])[name] = value
    elif key in field_names():
      setattr(config, key, value)
    else:
      config.hparams[key] = value  # checked against the algorithm's hyperparameters in `experiment.check_config`
  return config


def check_fields(config: Config) -> None:
  """Types and ranges of the fields (names of algorithms, datasets and models are checked in `experiment`)."""
  for name, low in _INT_FIELDS.items():
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
      raise ConfigError(f"config key {name} must be an integer{f' >= {low}' if low is not None else ''}, got {value!r}")
  value = config.eval_clients
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ConfigError(f"config key eval_clients must be an integer >= 1 or null (all clients), got {value!r}")
  if value is not None and config.num_clients and value > config.num_clients:
    raise ConfigError(f"config key eval_clients={value} exceeds num_clients={config.num_clients}")
  for name in _STR_FIELDS:
    if not isinstance(getattr(config, name), str):
      raise ConfigError(f"config key {name} must be a string, got {getattr(config, name)!r}")
  for name in _OPTIONAL_STR_FIELDS:
    if getattr(config, name) is not None and not isinstance(getattr(config, name), str):
      raise ConfigError(f"config key {name} must be a string or null, got {getattr(config, name)!r}")
  for name in ("hparams", "data_args", "model_args"):
    if not isinstance(getattr(config, name), dict):
      raise ConfigError(f"config key {name} must be a dict, got {getattr(config, name)!r}")
  for name in ("smoke", "shard_clients"):
    if not isinstance(getattr(config, name), bool):
      raise ConfigError(f"config key {name} must be true or false, got {getattr(config, name)!r}")


def shipped_names() -> list[str]:
  """Names of the config files shipped in `fedspa_jax/configs/`."""
  folder = pathlib.Path(__file__).parent / "configs"
  return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def _load_module(spec: str):
  path = pathlib.Path(spec).expanduser()
  if spec.endswith(".py") or path.is_file():
    if not path.is_file():
      raise ConfigError(f"config file {spec} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_fedspa_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
      module_spec.loader.exec_module(module)
    except SyntaxError as e:  # the user's file, not our code: one line, no traceback
      where = f"line {e.lineno}"
      if e.filename and pathlib.Path(e.filename).resolve() != path.resolve():  # in a file it imports
        where = f"{e.filename}, {where}"
      raise ConfigError(f"config file {spec} has a syntax error ({where}): {e.msg}") from None
    return module
  if spec not in shipped_names():
    raise ConfigError(f"unknown config {spec!r}; shipped configs: {', '.join(shipped_names())} (or a path to a .py file)")
  return importlib.import_module(f"fedspa_jax.configs.{spec}")


def load(spec: str = "default", *, smoke: bool = False) -> Config:
  """The `Config` of a config file: a shipped name (`"fashion_mnist_pathological"`) or a path to a `.py` file.

  Args:
    spec: name or path.
    smoke: ask the file for its tiny variant (`get_config(smoke=True)`).
  """
  module = _load_module(spec)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config {spec!r} has no get_config() function")
  config = module.get_config(smoke=True) if smoke else module.get_config()
  if isinstance(config, dict):
    config = Config.from_dict(config)
  if not isinstance(config, Config):
    raise ConfigError(f"get_config() of {spec!r} must return a fedspa_jax.config.Config or a dict, got {config!r}")
  return config


def trajectory_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """`"key: saved -> current"` for every field that differs and changes the run's trajectory."""
  lines = []
  for key in sorted(set(saved) | set(current)):
    if key in RESUMABLE_FIELDS or key == RESOLVED_KEY:
      continue
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      for sub in sorted(set(a) | set(b)):
        if a.get(sub, "<unset>") != b.get(sub, "<unset>"):
          lines.append(f"{key}.{sub}: {a.get(sub, '<unset>')!r} -> {b.get(sub, '<unset>')!r}")
    elif a != b:
      lines.append(f"{key}: {a!r} -> {b!r}")
  return lines
