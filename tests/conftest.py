"""Test-wide JAX settings: 8 forced CPU devices (for sharding tests), strict promotion rules, and a persistent
compilation cache.

Many tests compile the same programs (the tiny configs' rounds and evaluations, in several files, in the pytest-xdist
workers, and in the processes that tests/test_multihost.py starts). JAX's persistent cache, keyed by the program, the
JAX version and the flags, lets every compile after the first one load the executable instead: it shares compiled
functions across tests without changing what any test computes. `FEDSPA_TEST_JAX_CACHE=off` turns it off; any other
value is the folder to use (default: fedspa-jax-test-cache in the system's temporary folder).

Most of the suite's time is XLA:CPU compiling (the ResNet-18 and VGG programs above all), and most of that is LLVM
optimizing machine code for programs that then run for milliseconds. The tests compile at LLVM level 1
(`--xla_backend_optimization_level=1`: the same HLO programs; VGG-11's round compiled in about half the time), also
in the processes they start (`TEST_XLA_FLAGS`). Level 0 compiles a little faster still, but its code made the tests
that run for long (a fine-tuning epoch of Fashion-MNIST) slower than the default. `FEDSPA_TEST_FAST_COMPILE=off`
compiles as users do.
"""

import os
import tempfile

# For the processes that tests start with their own device count (tests/test_inflight.py, tests/test_multihost.py).
TEST_XLA_FLAGS = "" if os.environ.get("FEDSPA_TEST_FAST_COMPILE") == "off" else "--xla_backend_optimization_level=1"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}".strip())
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_cache = os.environ.get("FEDSPA_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fedspa-jax-test-cache"))
if _cache != "off":
  # Environment variables, so that the processes tests start (multi-process runs) share the cache too.
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")


# The slowest files first. With `--dist loadfile` a file runs whole on one worker, in collection order; a slow file
# that starts last keeps the other worker idle at the end of the suite.
SLOW_FIRST = ("test_preemption.py", "test_protocols.py", "test_data_tfds_resnet.py", "test_sweep.py",
              "test_data_natural.py", "test_population.py", "test_experiment.py", "test_models_train.py",
              "test_data_tfds_configs.py", "test_char_lstm.py", "test_accelerator_check.py", "test_inflight.py",
              "test_notebook.py", "test_multihost.py", "test_round.py", "test_gcs.py", "test_export.py", "test_cli.py",
              "test_cli_switch.py", "test_diverged.py", "test_resume.py", "test_fedspa.py", "test_evaluation.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
