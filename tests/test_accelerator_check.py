"""scripts/accelerator_check.sh: --quick passes on CPU with --allow-cpu; without an accelerator it fails (exit 1);
and the pieces its checks rest on (real-lane share, non-finite metrics, native convolutions) on hand-made inputs."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedspa_jax as fj
from script_loader import load as _load

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"



check = _load("accelerator_check")


def run_check(*args):
  """bash scripts/accelerator_check.sh ARGS with this interpreter, on CPU: (exit status, stdout + stderr)."""
  env = {**os.environ, "FEDSPA_PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(["bash", str(SCRIPTS / "accelerator_check.sh"), *args], env=env, capture_output=True,
                        text=True, timeout=600)
  return proc.returncode, proc.stdout + proc.stderr


def test_quick_mode_passes_on_cpu_and_prints_every_measure():
  code, out = run_check("--quick", "--allow-cpu")
  assert code == 0, out
  assert "backend cpu" in out and "0: cpu" in out  # the devices
  assert "PyTorch comparison skipped" in out  # no CUDA here (or no torch)
  for name in ("fedspa", "fedavg"):
    assert f"PASS: lenet5 {name} S=3: metrics and model finite" in out
    assert f"PASS: lenet5 {name} S=3: samples/s positive" in out
    assert f"SKIP: lenet5 {name} S=3: native convolutions (0; on CPU conv=auto picks im2col)" in out
    cells = r"\| ([\d.]+) \| ([\d,]+) \| skipped \| (\d+)% \| ([^|]+) \| n/a \|"
    row = re.search(rf"^\| lenet5 \| {name} \| 3 \| 1 {cells}$", out, re.MULTILINE)
    assert row, out
    compile_s, rate, share, memory = row.groups()
    assert float(compile_s) > 0 and int(rate.replace(",", "")) > 0 and 0 < int(share) <= 100
    assert memory.strip().endswith(("B", "KiB", "MiB", "GiB"))
  assert "checks: 5 passed, 0 failed" in out and out.rstrip().endswith("RESULT: PASS")


def test_without_an_accelerator_it_fails_with_what_to_install():
  code, out = run_check("--quick")
  assert code == 1, out
  assert "FAIL: an accelerator is found: JAX sees only CPU devices" in out
  assert '".[cuda12]"' in out and "--allow-cpu" in out and "RESULT: FAIL" in out


def test_real_lane_share_counts_each_group_at_its_most_steps():
  # Cohort of 3 real clients + 1 padding (id 5 = K), largest first, in groups of 2, batch 4:
  # group 1 runs 3 steps in 2 lanes, group 2 runs 1 step in 2 lanes: (3 + 1) * 2 * 4 = 32 lane slots.
  metrics = [{"cohort": np.array([0, 3, 1, 5]), "steps": np.array([3, 2, 1, 0]), "samples": np.array([10, 8, 3, 0])}]
  assert check.real_lane_share(metrics, group=2, batch_size=4, num_clients=5) == pytest.approx(21 / 32)
  assert check.real_lane_share(metrics, group=1, batch_size=4, num_clients=5) == pytest.approx(21 / 24)
  assert check.real_lane_share(metrics * 2, group=4, batch_size=4, num_clients=5) == pytest.approx(42 / 96)


def test_smaller_group_fits_the_cohort_in_free_device_memory():
  gib = 2**30
  stats = {"bytes_limit": 50 * gib, "bytes_in_use": 10 * gib}  # 40 GiB free
  assert check.smaller_group(1000, 30 * gib, stats) is None  # fits in 90% of 40 GiB
  assert check.smaller_group(1000, 100 * gib, stats) == 320  # 1000 * 0.8 * 40 / 100
  assert check.smaller_group(1000, 37 * gib, stats) == 500  # just over 90%: at least halved
  assert check.smaller_group(8, 10_000 * gib, stats) == 1
  assert check.smaller_group(1, 100 * gib, stats) is None  # one client at a time: nothing smaller to try
  assert check.smaller_group(1000, 100 * gib, {}) is None  # CPU: no allocator statistics


def test_non_finite_names_bad_metrics_of_real_clients_and_the_model():
  params = {"w": np.ones(3, np.float32)}
  good = {"cohort": np.array([0, 1, 2]), "loss": np.array([0.5, 1.0, np.nan]), "samples": np.array([4, 4, 0])}
  assert check.non_finite([good], params, num_clients=2) == []  # the NaN belongs to a padding client
  bad = {**good, "cohort": np.array([0, 1, 1]), "accuracy": np.float32(np.inf)}
  assert check.non_finite([good, bad], params, num_clients=2) == ["metric 'accuracy'", "metric 'loss'"]
  assert check.non_finite([good], {"w": np.array([1.0, np.inf])}, num_clients=2) == ["server model"]


@pytest.mark.parametrize("conv, expected", [("xla", 2), ("im2col", 0)])
def test_native_convolutions_counts_the_lowered_program(conv, expected):
  model = fj.models.get("lenet5", num_classes=10, conv=conv)
  x = jnp.zeros((2, 28, 28, 1))
  params = model.init(jax.random.key(0), x)
  assert check.native_convolutions(jax.jit(model.apply).lower(params, x)) == expected
