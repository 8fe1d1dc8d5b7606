"""Sharded loops that never block cannot deadlock XLA:CPU, and give what the blocked loop gives.

Unpaced, a loop that runs more than 32 sharded programs ahead of a CPU mesh aborts the process after XLA's 40 s
collective rendezvous timeout (see `fedspa_jax.inflight`). So each check runs this file as a script in a child
process with its own forced device count, under a timeout: an abort or a hang fails the test instead of ending
the test session.
"""

import os
import pathlib
import subprocess
import sys

import pytest
from conftest import TEST_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROUNDS = 600  # far past the runtime's 32 programs in flight per device
CALLS = 80  # evaluate calls in a row


def run_child(devices: int, sampling: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
         "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
  return subprocess.run([sys.executable, __file__, str(devices), sampling], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=480)


@pytest.mark.parametrize("devices, sampling", [(2, "uniform"), (8, "stratified")])
def test_unblocked_sharded_loops_finish_and_equal_the_blocked_loop(devices, sampling):
  result = run_child(devices, sampling)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert f"ok {devices} devices" in result.stdout


def test_needs_pacing_only_on_a_cpu_mesh_of_several_devices():
  import jax
  from fedspa_jax import inflight

  devices = jax.devices()
  assert len(devices) == 8 and devices[0].platform == "cpu", "conftest forces 8 CPU devices"
  assert inflight.needs_pacing(jax.make_mesh((8,), ("clients",)))
  assert not inflight.needs_pacing(jax.make_mesh((1,), ("clients",), devices=devices[:1]))
  assert not inflight.needs_pacing(None)


def test_the_pacer_keeps_at_most_its_limit_in_flight():
  import jax
  import jax.numpy as jnp
  from fedspa_jax import inflight

  pacer = inflight.Pacer(limit=3)
  step = jax.jit(lambda x: (x + 1, jnp.sum(x)), donate_argnums=0)
  x = jnp.zeros((4,))
  for i in range(10):
    x, total = pacer.call(step, x)
    assert pacer.tracked <= 3
  pacer.drain()
  assert pacer.tracked == 0 and float(total) == 4 * 9  # donated outputs are skipped, not waited on
  with pytest.raises(ValueError, match="limit"):
    inflight.Pacer(limit=0)


def child(devices: int, sampling: str) -> None:
  """The check itself, in a process with `devices` forced CPU devices."""
  import jax
  import numpy as np

  import fedspa_jax as fj
  from fedspa_jax.round import make_client_mesh

  assert jax.device_count() == devices
  data = fj.data.synthetic(1.0, 1.0, num_clients=2 * devices, dimension=8, max_samples_per_client=10, seed=0)
  model = fj.models.get("mlp", num_classes=10, hidden=(4,))
  algo = fj.algorithms.get("fedavg", model=model, mesh=make_client_mesh(), clients_per_round=devices, local_steps=1,
                           batch_size=4, rounds=ROUNDS, cohort_sampling=sampling)
  placed = algo.place(data)

  is_key = lambda a: isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
  host = lambda tree: jax.device_get(jax.tree.map(lambda a: jax.random.key_data(a) if is_key(a) else a, tree))
  assert_equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, host(a), host(b))

  def loop(block: bool):
    state = algo.init(jax.random.key(0), placed)
    for _ in range(ROUNDS):
      state, metrics = algo.round(state, placed)
      if block:
        jax.block_until_ready((state, metrics))
    return state, metrics

  state, metrics = loop(block=False)  # first: on a deadlock, fail before the long blocked loop
  unblocked = host((state, metrics))
  assert_equal(unblocked, loop(block=True))
  assert int(unblocked[0].round) == ROUNDS

  ids = np.arange(0, 2 * devices, 3)
  reference = jax.block_until_ready((algo.evaluate(state, placed), algo.evaluate(state, placed, ids)))
  evaluations = [algo.evaluate(state, placed, ids if i % 2 else None) for i in range(CALLS)]  # never blocked
  for i, ev in enumerate(evaluations):
    assert_equal(ev, reference[i % 2])
  # Each client_states call compiles its own program, so no loop of them outruns the devices; a few show that the
  # paced call returns the same.
  first = algo.client_states(state, placed, ids)
  for _ in range(3):
    assert_equal(algo.client_states(state, placed, ids), first)
  print(f"ok {devices} devices, {ROUNDS} rounds and {CALLS} evaluations unblocked", flush=True)


if __name__ == "__main__":
  child(int(sys.argv[1]), sys.argv[2])
