"""Test-wide JAX settings: 8 forced CPU devices (for sharding tests), strict promotion rules, and a persistent
compilation cache.

Many tests compile the same programs (the tiny configs' rounds and evaluations, in several files, in the pytest-xdist
workers, and in the processes that tests/test_multihost.py starts). JAX's persistent cache, keyed by the program, the
JAX version and the flags, lets every compile after the first one load the executable instead: it shares compiled
functions across tests without changing what any test computes. `FEDSPA_TEST_JAX_CACHE=off` turns it off; any other
value is the folder to use (default: fedspa-jax-test-cache in the system's temporary folder).

Most of the suite's time is XLA:CPU compiling programs that then run for milliseconds. The tests compile with two
flags (`TEST_XLA_FLAGS`, also in the processes they start): LLVM at optimization level 0
(`--xla_backend_optimization_level=0`) and XLA's older loop emitters instead of its new fusion emitters
(`--xla_cpu_use_fusion_emitters=false`). They change how XLA:CPU turns the programs into machine code (results may
differ in the last bits, as between machines); that code runs slower, which only a test that runs for long would
notice (none does: the one that did now fine-tunes on a subset of Fashion-MNIST). Measured on the 2-core machine of
docs/benchmarks.md, cold cache, 2 workers, 2026-12-02: the suite took 634 s and 736 s at level 1 with the fusion
emitters, 426 s with these flags, and 363 s once the reference-recipe test used a subset.
`FEDSPA_TEST_FAST_COMPILE=off` compiles as users do.
"""

import importlib.metadata
import os
import tempfile

# For the processes that tests start with their own device count (tests/test_inflight.py, tests/test_multihost.py).
FAST_COMPILE = "--xla_backend_optimization_level=0"
# XLA aborts on a flag it does not know; this one is there in jaxlib 0.10 (checked with 0.10.2), not looked for before.
if tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2]) >= (0, 10):
  FAST_COMPILE += " --xla_cpu_use_fusion_emitters=false"
TEST_XLA_FLAGS = "" if os.environ.get("FEDSPA_TEST_FAST_COMPILE") == "off" else FAST_COMPILE
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
SLOW_FIRST = ("test_preemption.py", "test_job.py", "test_protocols.py", "test_data_tfds_resnet.py", "test_sweep.py",
              "test_claims.py", "test_data_natural.py", "test_availability.py", "test_population.py",
              "test_experiment.py", "test_privacy.py", "test_models_train.py", "test_recipe_knobs.py",
              "test_sparse_family.py", "test_data_tfds_configs.py", "test_char_lstm.py", "test_accelerator_check.py",
              "test_inflight.py", "test_notebook.py", "test_dispfl.py", "test_multihost.py", "test_round.py",
              "test_prunefl.py", "test_gcs.py", "test_export.py", "test_feddst.py", "test_cli.py", "test_cli_switch.py",
              "test_diverged.py", "test_resume.py", "test_fedspa.py", "test_references.py", "test_evaluation.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept
