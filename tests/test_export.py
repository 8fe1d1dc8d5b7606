"""Programs proven to lower for accelerators without one: `jax.export` for cuda and tpu from this CPU machine.

One FedSpa round, one FedAvg round and one FedSpa evaluation of LeNet-5 (so there are convolutions) are exported
for each platform, on one device and over an abstract mesh of 8 devices (`jax.sharding.AbstractMesh`: the devices
need not exist). Each exported module is read as text (StableHLO) and must show what its platform should run:
native convolutions and no im2col on accelerators, the reverse on CPU; no host callback, no custom call outside a
short allowlist, no effects. (`jax.export` itself refuses host callbacks: "serialization of host_callbacks is not
yet implemented".) A last test proves that no Python-level choice from the host's backend leaks into a program
exported for another platform. The mesh's state and data are shapes with shardings: an `AbstractMesh` holds no
arrays, so `init` and `place` cannot run on it; the shapes are those of the single-device state (8 clients on 8
devices need no padding) and the blocks `population.place` would build.
"""

import re

import jax
import numpy as np
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import fedspa_jax as fj
from fedspa_jax import population
from fedspa_jax.algorithms import base
from fedspa_jax.data.federated import ClientSplit
from fedspa_jax.models.conv import IM2COL_SCOPE

NUM_CLIENTS = 8  # a multiple of the mesh's 8 devices: the sharded store has the single-device shapes
DEVICES = 8
HPARAMS = dict(clients_per_round=4, local_epochs=None, local_steps=2, batch_size=4, rounds=5)
OWN_HPARAMS = {"fedspa": dict(density=0.5), "fedavg": {}}
# The programs exported: (algorithm, its pure function), the functions the engine jits.
PROGRAMS = {"fedspa_round": ("fedspa", "round_fn"), "fedavg_round": ("fedavg", "round_fn"),
            "fedspa_evaluate": ("fedspa", "evaluate_fn")}
PLATFORMS = ("cpu", "cuda", "tpu")
# Custom calls a program may hold on any platform: the partitioner's own markers (shard_map, sharding hints).
PORTABLE_CUSTOM_CALLS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (NUM_CLIENTS * 8, 28, 28, 1), dtype=np.uint8)
  y = np.arange(NUM_CLIENTS * 8) % 10
  return fj.data.from_arrays(x, y, num_clients=NUM_CLIENTS, partition="iid", num_classes=10)


@pytest.fixture(scope="module")
def model():
  return fj.models.get("lenet5", num_classes=10)


def client_mesh(platform: str | None = None) -> AbstractMesh:
  """The client mesh of `round.make_client_mesh`, for 8 devices this machine need not have."""
  device = None if platform is None else AbstractDevice(device_kind=platform, num_cores=None, platform=platform)
  return AbstractMesh((DEVICES,), ("clients",), axis_types=(AxisType.Auto,), abstract_device=device)


def abstract(tree, sharding=None):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def abstract_state(name, model, data, mesh=None):
  """The state algorithm `name`'s `init` returns, as shapes (nothing is computed); over `mesh`, sharded as the sharded
  init lays it out."""
  algo = fj.algorithms.get(name, model=model, **HPARAMS, **OWN_HPARAMS[name])
  state = jax.eval_shape(algo.init, jax.random.key(0), data)
  if mesh is None:
    return state
  by_client, replicated = NamedSharding(mesh, P("clients")), NamedSharding(mesh, P())
  return state._replace(server=abstract(state.server, replicated), clients=abstract(state.clients, by_client),
                        round=abstract(state.round, replicated), key=abstract(state.key, replicated),
                        participation=abstract(state.participation, by_client))


def abstract_placed(data, mesh) -> population.PlacedData:
  """What `algo.place(data)` returns over `mesh`, as shapes: the blocks' layout without any device to hold it."""
  placement = population.make_placement(data.num_clients, mesh)
  by_client = NamedSharding(mesh, P("clients"))

  def split(s: ClientSplit) -> ClientSplit:
    rows = placement.shards * population.block_rows(s, placement)[3]
    shape = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=by_client)
    return ClientSplit(x=shape((rows, *s.x.shape[1:]), s.x.dtype), y=shape((rows,), s.y.dtype),
                       offset=shape((placement.padded,), np.int32), count=shape((placement.padded,), np.int32),
                       max_count=s.max_count)

  return population.PlacedData(train=split(data.train), test=split(data.test), placement=placement,
                               num_classes=data.num_classes, name=data.name, mean=data.mean, std=data.std)


def build(model, layout: str, platform: str) -> dict:
  """{algorithm name: Algorithm} for one layout ("single" or "mesh") and target platform."""
  mesh = client_mesh() if layout == "mesh" else None
  return {name: fj.algorithms.get(name, model=model, mesh=mesh, platform=platform, **HPARAMS, **own)
          for name, own in OWN_HPARAMS.items()}


def export_args(name, model, data, layout):
  if layout == "mesh":
    return abstract_state(name, model, data, client_mesh()), abstract_placed(data, client_mesh())
  return abstract_state(name, model, data), abstract(data)


@pytest.fixture(scope="module")
def exported(model, data):
  """Exports, made once on first use: (layout, platform, program) -> (Exported, module text)."""
  made, algos, args = {}, {}, {}

  def get(layout, platform, program):
    if (layout, platform, program) not in made:
      name, fn = PROGRAMS[program]
      if (layout, platform) not in algos:
        algos[layout, platform] = build(model, layout, platform)
      if (name, layout) not in args:
        args[name, layout] = export_args(name, model, data, layout)
      run = getattr(algos[layout, platform][name], fn)
      exp = export.export(jax.jit(run), platforms=(platform,))(*args[name, layout])
      made[layout, platform, program] = exp, exp.mlir_module()
    return made[layout, platform, program]

  return get


def custom_call_targets(text: str) -> set[str]:
  return set(re.findall(r"custom_call @([\w.$-]+)", text)) | set(re.findall(r'call_target_name = "([^"]+)"', text))


def without_locations(text: str) -> str:
  """The module's ops alone: source locations (which name the tracing call stack) dropped."""
  text = re.sub(r"^#loc.*\n", "", text, flags=re.M)
  return re.sub(r" loc\((?:[^()]|\([^()]*\))*\)", "", text)


CASES = [(layout, platform, program) for layout in ("single", "mesh") for platform in PLATFORMS
         for program in ("fedspa_round", "fedavg_round", "fedspa_evaluate")]


@pytest.mark.parametrize("layout,platform,program", CASES)
def test_exported_program_fits_its_platform(exported, layout, platform, program):
  exp, text = exported(layout, platform, program)
  assert exp.platforms == (platform,)
  assert exp.nr_devices == (DEVICES if layout == "mesh" else 1)
  convolutions = text.count("stablehlo.convolution")
  if platform == "cpu":  # im2col: shifted slices and matmuls, no convolution
    assert convolutions == 0 and IM2COL_SCOPE in text
  else:  # XLA's own convolution; nothing of im2col's staged out
    assert convolutions >= 2 and IM2COL_SCOPE not in text
  # Nothing that needs the host or one platform's libraries: no callbacks, no foreign custom calls, no effects.
  assert "callback" not in text
  assert custom_call_targets(text) <= PORTABLE_CUSTOM_CALLS, custom_call_targets(text)
  assert not exp.ordered_effects and not exp.unordered_effects
  assert "f64" not in text  # TPUs have no float64
  if layout == "mesh":  # one program for the 8 devices, the client axis split by a shard_map
    assert "mhlo.num_partitions = 8" in text
    assert re.search(r'sdy\.mesh @\w+ = <\["clients"=8\]>', text)
    assert "sdy.manual_computation" in text
    if program.endswith("round"):  # the cohort moves between devices; the aggregate is summed over them
      assert "stablehlo.all_to_all" in text and "stablehlo.all_reduce" in text


def test_training_round_has_the_gradient_convolutions(exported):
  """A training round also lowers the convolutions' gradients natively: forward and backward of both layers."""
  _, round_text = exported("single", "tpu", "fedavg_round")
  _, eval_text = exported("single", "tpu", "fedspa_evaluate")
  assert round_text.count("stablehlo.convolution") > eval_text.count("stablehlo.convolution") >= 2


def test_no_host_backend_leaks_into_an_export(model, data, exported, monkeypatch):
  """The tpu program does not depend on the host's backend: exported with `jax.default_backend()` pretending to be
  a GPU, it is the same text. A Python branch on the host's backend (as `conv="auto"` once was) would differ."""
  _, want = exported("single", "tpu", "fedspa_round")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  fresh = build(model, "single", "tpu")["fedspa"].round_fn  # new closures: traced again, under the patch
  got = export.export(jax.jit(fresh), platforms=("tpu",))(*export_args("fedspa", model, data, "single")).mlir_module()
  assert without_locations(got) == without_locations(want)


# ---------------------------------------------------------------------------------------------- cohort_batch="auto"


@pytest.mark.parametrize("platform,expected", [("cpu", 1), ("cuda", None), ("rocm", None), ("gpu", None),
                                               ("tpu", None)])
def test_cohort_batch_auto_per_platform(platform, expected):
  assert base.resolve_cohort_batch("auto", base.target_platform(platform=platform)) == expected
  assert base.resolve_cohort_batch(3, platform) == 3 and base.resolve_cohort_batch(None, platform) is None


def test_target_platform_follows_the_mesh():
  assert base.target_platform() == jax.default_backend()
  assert base.target_platform(fj.round.make_client_mesh()) == "cpu"  # this machine's 8 CPU devices
  assert base.target_platform(client_mesh("tpu")) == "tpu"
  assert base.target_platform(client_mesh("cuda"), "gpu") == "gpu"  # the same kind of device, named twice
  assert base.target_platform(client_mesh(), "tpu") == "tpu"  # an AbstractMesh without a device: as given
  assert base.target_platform(client_mesh()) == jax.default_backend()
  with pytest.raises(ValueError, match="does not match the mesh"):
    fj.algorithms.get("fedavg", model=fj.models.get("mlp", 10), mesh=fj.round.make_client_mesh(), platform="tpu")
  with pytest.raises(ValueError, match="platform must be one of"):
    fj.algorithms.get("fedavg", model=fj.models.get("mlp", 10), platform="metal")


def test_round_runs_the_target_platforms_grouping():
  """The round built for a platform is the round built with that platform's grouping, spelled out."""
  model = fj.models.get("mlp", num_classes=10, hidden=(8,))
  small = fj.data.synthetic(num_clients=6, max_samples_per_client=20, seed=0)
  state = jax.eval_shape(fj.algorithms.get("fedavg", model=model, **HPARAMS).init, jax.random.key(0), small)
  jaxpr = lambda **kw: str(jax.make_jaxpr(fj.algorithms.get("fedavg", model=model, **HPARAMS, **kw).round_fn)(
      state, small))
  assert jaxpr(platform="tpu") == jaxpr(cohort_batch=None) != jaxpr(cohort_batch=1) == jaxpr(platform="cpu")


def test_an_abstract_mesh_builds_programs_but_holds_no_arrays(data):
  algo = fj.algorithms.get("fedavg", model=fj.models.get("mlp", 10), mesh=client_mesh(), **HPARAMS)
  with pytest.raises(TypeError, match="init needs devices"):
    algo.init(jax.random.key(0), data)
  with pytest.raises(TypeError, match="place needs devices"):
    algo.place(data)
