"""Claims the docs make, each with a test that fails if it is false: the round donates its state, a run killed in the
middle of a checkpoint write keeps its previous checkpoint and resumes from it, a second Ctrl-C exits 130, a diverged
seed stops a sweep without --lrs, and the chunked initialisation of the client store does not depend on the chunking.

The run-loop claims go through the public entry points (the `fedspa-jax` command, `experiment.run`/`sweep`).
"""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from fedspa_jax import cli, experiment
from fedspa_jax import config as config_lib
from fedspa_jax import store as store_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config", "default", "--set", "smoke=true", "--set", "num_clients=8", "--set", "hparams.clients_per_round=4",
        "--set", "model.hidden=[8]", "--no-plots", "--quiet"]


def tiny_config(**changes) -> config_lib.Config:
  base = dataclasses.replace(config_lib.load("default", smoke=True), num_clients=8, **changes)
  return config_lib.apply_overrides(base, [("hparams.clients_per_round", 4), ("model.hidden", [8])])


def records(run_dir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the round donates its state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fedspa", "ditto"])
def test_the_round_donates_every_leaf_of_its_state(name):
  data = jax.device_put(fj.data.synthetic(1.0, 1.0, num_clients=6, seed=0, max_samples_per_client=30))
  model = fj.models.get("mlp", num_classes=10, hidden=(8,))
  algo = fj.algorithms.get(name, model=model, clients_per_round=2, local_steps=1, local_epochs=None, batch_size=8)
  state = algo.init(jax.random.key(0), data)
  leaves = jax.tree.leaves(state)
  assert len(leaves) >= 5 and not any(leaf.is_deleted() for leaf in leaves)
  new, _ = algo.round(state, data)
  deleted = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0] if leaf.is_deleted()]
  assert len(deleted) == len(leaves), f"not donated: {set(map(str, range(len(leaves)))) - set(deleted)}"
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new))
  with pytest.raises(RuntimeError, match="deleted|donated"):
    np.asarray(state.participation)


# --- the client store's chunked init ----------------------------------------------------------------------------------


def test_chunked_store_init_is_independent_of_the_chunking():
  params = {"dense": {"kernel": jnp.zeros((12, 7)), "bias": jnp.zeros((7,))}, "head": {"kernel": jnp.zeros((7, 3))}}
  densities = fj.masks.uniform_densities(params, 0.3)
  key = jax.random.key(5)

  def init_clients(key, params, ids):
    return fj.masks.init_client_masks(key, params, densities, ids=ids)

  layout = store_lib.make_layout(init_clients, params)
  per_client = 12 * 7 + 7 + 7 * 3  # decoded bytes of one client's bool mask
  num_clients = 10  # a multiple of none of the chunk sizes below but 1
  stores = {chunk: store_lib.init_store(init_clients, layout, key, params, num_clients, chunk_bytes=chunk * per_client)
            for chunk in (1, 3, 4, 10)}
  decoded = {chunk: layout.gather(s, jnp.arange(num_clients, dtype=jnp.int32)) for chunk, s in stores.items()}
  for k in range(num_clients):
    # The documented rule: client k's mask is drawn from fold_in(key, k), whatever chunk it falls in.
    expected = fj.masks.init_masks(jax.random.fold_in(key, k), params, densities)
    for chunk, masks in decoded.items():
      for got, want in zip(jax.tree.leaves(masks), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want), err_msg=f"client {k}, chunk {chunk}")
  # Clients draw different masks (a chunking that repeated a client would show here).
  kernels = np.asarray(decoded[3]["dense"]["kernel"]).reshape(num_clients, -1)
  assert len({row.tobytes() for row in kernels}) == num_clients


# --- a run killed in the middle of a checkpoint write -----------------------------------------------------------------

# Runs the command line in a process that kills itself (SIGKILL: no handler, no cleanup) while orbax writes the
# checkpoint of round KILL_AT: after the arrays' write has started, before the step folder is committed.
KILL_DURING_SAVE = textwrap.dedent("""
    import os, pathlib, signal, sys, time
    import orbax.checkpoint as ocp
    from fedspa_jax import cli

    KILL_AT = sys.argv[1]
    real = ocp.StandardCheckpointHandler.async_save

    def async_save(self, directory, *args, **kwargs):
      out = real(self, directory, *args, **kwargs)
      if pathlib.Path(str(directory)).parent.name.split(".")[0] == KILL_AT:
        print("killing during the save", flush=True)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGKILL)
      return out

    ocp.StandardCheckpointHandler.async_save = async_save
    sys.exit(cli.main(sys.argv[2:]))
""")


def test_a_run_killed_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
  settings = [*TINY, "--set", "rounds=4", "--set", "eval_every=1", "--set", "checkpoint_every=1"]
  run_dir = tmp_path / "killed"
  killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "3", "run", *settings, "--out", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
  assert "killing during the save" in killed.stdout
  left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
  assert "3" not in left and "2" in left, left  # round 3's write never completed; round 2's is there
  assert any(not name.isdigit() for name in left), left  # the interrupted write's temporary folder
  assert cli.main(["run", "--out", str(run_dir), "--resume", "--no-plots", "--quiet"]) == 0
  assert all(p.name.isdigit() for p in (run_dir / "checkpoints").iterdir())  # no leftovers
  reference = tmp_path / "reference"
  assert cli.main(["run", *settings, "--out", str(reference)]) == 0
  got, want = records(run_dir), records(reference)
  assert [r["round"] for r in got] == [1, 2, 3, 4]  # none lost, none repeated
  for a, b in zip(got, want):
    np.testing.assert_allclose([a[k] for k in b if k != "wall_time"], [b[k] for k in b if k != "wall_time"],
                               rtol=1e-5, atol=1e-6)


# --- a second Ctrl-C --------------------------------------------------------------------------------------------------

# Runs the command line with a long dispatch after the first Ctrl-C: once a stop is requested, the boundary check
# announces itself and waits 60 s before deciding (a dispatch still running). A second Ctrl-C in that time comes
# before the stop is decided, so it interrupts at once (after the decision signals are ignored: issue 25).
SLOW_DISPATCH = textwrap.dedent("""
    import sys, time
    from fedspa_jax import cli, preemption

    real = preemption.Stopper.should_stop

    def should_stop(self, round):
      if self.requested is not None and self.decided is None:
        print("a dispatch is still running", flush=True)
        time.sleep(60)
      return real(self, round)

    preemption.Stopper.should_stop = should_stop
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_a_second_ctrl_c_exits_130_without_waiting(tmp_path):
  run_dir, log = tmp_path / "x", tmp_path / "stdout.txt"
  with open(log, "w") as stdout:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_DISPATCH, "run", *TINY, "--set", "rounds=100000",
                             "--set", "eval_every=50", "--set", "checkpoint_every=0", "--out", str(run_dir)],
                            cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip(),
               proc, "the run did not start training")
    os.kill(proc.pid, signal.SIGINT)  # the first: stop at the next round boundary, with a checkpoint
    wait_until(lambda: "a dispatch is still running" in log.read_text(), proc, "the stop was not requested")
    started = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)  # the second, before the stop is decided: do not wait for the boundary
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  assert proc.returncode == cli.EXIT_INTERRUPTED == 130, log.read_text()[-2000:] + err[-2000:]
  assert "interrupted; continue with --resume" in err
  assert time.monotonic() - started < 50  # it did not sit out the 60 s dispatch


def wait_until(condition, proc, message, timeout=180):
  deadline = time.monotonic() + timeout
  while not condition():
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, message
    time.sleep(0.05)


# --- a diverged seed stops a sweep without --lrs ----------------------------------------------------------------------


def test_a_diverged_seed_stops_a_sweep_without_lrs(tmp_path, capsys):
  out = tmp_path / "sweep"
  settings = [a for a in TINY if a != "--no-plots"]  # a sweep draws no plots
  code = cli.main(["sweep", "--seeds", "0", "1", *settings, "--set", "rounds=6", "--set", "eval_every=1",
                   "--set", "checkpoint_every=1", "--set", "hparams.lr=1e30", "--out", str(out)])
  assert code == cli.EXIT_DIVERGED == 3
  assert "diverged" in capsys.readouterr().err
  assert not (out / "summary.json").is_file() or json.loads((out / "summary.json").read_text())["status"] != "complete"
  for seed in (0, 1):
    rounds = [r["round"] for r in records(out / f"seed_{seed}")] if (out / f"seed_{seed}" / "metrics.jsonl").is_file() \
        else []
    assert len(rounds) < 6  # it stopped; nothing past the divergence ran to the end
  # No checkpoint holds the diverged state.
  assert not (out / "checkpoints").is_dir() or not [p for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
