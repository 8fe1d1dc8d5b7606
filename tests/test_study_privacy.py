"""scripts/study_privacy.py's plan (issue 30): the pinned noise multipliers meet their epsilons by dp-accounting's own
RDP accountant, each setting's options, the cells, and the lock that shares them between processes."""

import pytest
from script_loader import load


@pytest.fixture(scope="module")
def study():
  return load("study_privacy")


# docs/privacy.md's figure for the seeded study's length, 100 rounds of 10 from 100 clients (not a study setting)
DOCS_NOISE = {(100, 10, 100): {8: 3.038, 4: 5.025, 1: 16.819}}


@pytest.mark.parametrize("key,target", [(k, t) for k in ((100, 10, 40), (10000, 100, 100), (100, 10, 100))
                                        for t in (8, 4, 1)])
def test_pinned_noise_is_the_smallest_that_meets_each_epsilon(study, key, target):
  # "the smallest z, to 3 decimals, whose epsilon after the group's rounds is at most the
  # target", asked of dp-accounting directly on the run's event: a fixed-size cohort drawn without replacement, the
  # Gaussian sum at multiplier z / 2 (replace-one neighbours move the clipped sum by up to 2C), composed once a round.
  import dp_accounting

  clients, per_round, rounds = key

  def eps(z):
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        clients, per_round, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    return accountant.get_epsilon(study.DELTA)

  assert (study.FASHION_ROUNDS, study.SYNTHETIC_ROUNDS) == (40, 100)  # the groups' lengths the keys name
  z = {**study.NOISE, **DOCS_NOISE}[key][target]
  assert eps(z) <= target < eps(round(z - 0.001, 3))  # meets it, and one grid step less would not


def test_each_setting_sets_what_its_name_says(study):
  assert study.setting_hparams("none", (100, 10), 40) == {}
  assert study.setting_hparams("drop0.6", (100, 10), 40) == {"dropout": 0.6}
  dp = study.setting_hparams("eps4", (100, 10), 40)
  assert dp == {"dp_clip": 0.5, "dp_quantile": 0.5, "dp_noise_multiplier": 3.456, "dp_delta": 1e-5,
                "dp_count_noise": 3.456}  # sigma_b = max(S / 20, z) = z
  # Synthetic: S / 20 = 5 is above z = 1.348
  assert study.setting_hparams("eps4", (10000, 100), 100)["dp_count_noise"] == 5.0


def test_the_search_finds_the_smallest_z_on_the_grid(study):
  # Another length is not pinned: the search, with the library's accountant (itself held to dp-accounting in
  # tests/test_privacy.py). The tiny tier's population, 4 of 20 clients, over 4 rounds.
  from fedspa_jax import privacy

  z = study.noise_for((20, 4), 8.0, 4)
  assert privacy.epsilon(20, 4, z, 4, study.DELTA) <= 8 < privacy.epsilon(20, 4, round(z - 0.001, 3), 4, study.DELTA)


def test_the_cells_cover_the_study_once_with_each_groups_rounds(study):
  cells = study.cells("full")
  # Fashion-MNIST 4 methods x 6 settings, Synthetic 2 x 2, and the fixed small clip's 4 methods at epsilon 8
  assert len(cells) == len(set(cells)) == 4 * 6 + 2 * 2 + 4
  assert study.make_config("full", "fashion_mnist", "ditto", "eps1").rounds == 40
  assert study.make_config("full", "fashion_mnist", "ditto", "eps1").hparams["dp_noise_multiplier"] == 10.74
  # the many-clients point: Synthetic-IID (a shared model to learn), 100 of 10,000 clients a round
  assert study.cells("full", "synthetic_iid") == [("synthetic_iid", m, s) for s in ("none", "eps4")
                                                  for m in ("fedspa", "fedavg")]
  config = study.make_config("full", "synthetic_iid", "fedavg", "eps4")
  assert config.data_args["iid"] is True and config.num_clients == 10000 and config.rounds == 100
  fixed = study.make_config("full", "fashion_mnist_clip0.05", "fedspa", "eps8").hparams
  assert {k: v for k, v in fixed.items() if k.startswith("dp_")} == {
      "dp_clip": 0.05, "dp_noise_multiplier": 2.125, "dp_delta": 1e-5}  # no dp_quantile: the clip stays 0.05


def test_a_claimed_cell_is_taken_by_one_live_process_and_freed_when_it_ends(study, tmp_path):
  import subprocess
  import sys
  import textwrap

  # Another process holds the cell until told to end: this one cannot take it; once that process has ended (as a
  # session's end kills it, with no chance to clean up), the cell is free again.
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import fcntl, sys
      f = open({str(tmp_path / "claim")!r}, "a")
      fcntl.flock(f, fcntl.LOCK_EX)
      print("held", flush=True)
      sys.stdin.readline()
  """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    assert not study.claim(tmp_path)
    holder.kill()
    holder.wait(timeout=30)
    assert study.claim(tmp_path)
    assert (tmp_path / "claim").exists()  # the file the ended process left: its lock went with it
  finally:
    holder.kill()


def _cell(method, setting, accuracies, epsilon=None):
  return {"group": "g", "method": method, "setting": setting, "status": "complete", "seeds": [1, 2, 3],
          "rounds": 40, "final_accuracy_mean_per_seed": accuracies, "dp_epsilon": epsilon,
          "dp_epsilon_per_seed": [epsilon] * 3, "clients_dropped_per_seed": [0, 0, 0]}


def test_the_tables_say_lower_only_where_welch_says_so(study, tmp_path):
  from scipy import stats

  document = {"date": "2026-12-07", "cells": [
      _cell("fedspa", "none", [0.80, 0.81, 0.82]), _cell("fedavg", "none", [0.80, 0.81, 0.82]),
      _cell("fedspa", "eps8", [0.50, 0.51, 0.52], 7.99), _cell("fedavg", "eps8", [0.79, 0.83, 0.80], 7.98)]}
  text = study.section(document)
  p_spa = stats.ttest_ind([0.50, 0.51, 0.52], [0.80, 0.81, 0.82], equal_var=False).pvalue  # ~3e-6
  p_vs_avg = stats.ttest_ind([0.50, 0.51, 0.52], [0.79, 0.83, 0.80], equal_var=False).pvalue
  assert p_spa < 0.05 and p_vs_avg < 0.05
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert f"| FedSpa (d=0.5) | 0.810 ± 0.008 | 0.510 ± 0.008 (lower, p = {p_spa:.2g}) |" in rows
  assert "| FedAvg | 0.810 ± 0.008 | 0.807 ± 0.017 (tied) |" in rows  # 0.79, 0.83, 0.80 against 0.80-0.82
  assert "| epsilon (largest run's) | - | 7.990 |" in rows
  assert "| no DP | tied |" in rows and f"| epsilon 8 | behind (p = {p_vs_avg:.2g}) |" in rows
  # the docs' block: written, held to the file, and a changed number is caught
  (tmp_path / "study_privacy.json").write_text(__import__("json").dumps(document))
  page = tmp_path / "benchmarks.md"
  page.write_text(f"before\n{study.BEGIN}\nold\n{study.END}\nafter\n")
  study.update_docs(page, text)
  args = type("Args", (), {"docs": str(tmp_path), "benchmarks": str(page)})
  assert study.check(args) == 0 and page.read_text().startswith("before\n") and page.read_text().endswith("after\n")
  page.write_text(page.read_text().replace("0.510 ± 0.008", "0.610 ± 0.008"))
  assert study.check(args) == 1


def test_a_diverged_cell_says_where_it_diverged(study):
  # the error a cell.json holds, as the study's sweep wrote it (runs/study_privacy, FedSpa at epsilon 8, 2026-12-07)
  error = ("seed 1: training diverged in round 3: client training losses [          nan 1.8284748e+00 5.9015083e-01 "
           "1.2106002e+04]; no checkpoint was written before it.")
  assert study.diverged_at(error) == {"seed": 1, "round": 3} and study.diverged_at("") is None
  lost = {**_cell("fedspa", "eps8", []), "status": "diverged", "diverged": {"seed": 1, "round": 3}}
  text = study.section({"date": "2026-12-07", "cells": [_cell("fedspa", "none", [0.80, 0.81, 0.82]), lost]})
  assert "| FedSpa (d=0.5) | 0.810 ± 0.008 | diverged (round 3, seed 1) |" in text.splitlines()


def test_a_group_without_its_own_no_dp_runs_is_held_to_its_baselines(study):
  from scipy import stats

  fixed = {**_cell("fedspa", "eps8", [0.30, 0.32, 0.34], 8.0), "group": "h", "baseline_group": "g"}
  text = study.section({"date": "2026-12-07", "cells": [_cell("fedspa", "none", [0.80, 0.81, 0.82]), fixed]})
  p = stats.ttest_ind([0.30, 0.32, 0.34], [0.80, 0.81, 0.82], equal_var=False).pvalue
  group_h = text.split("**h**", 1)[1].splitlines()
  assert f"| FedSpa (d=0.5) | 0.810 ± 0.008 | 0.320 ± 0.016 (lower, p = {p:.2g}) |" in group_h
  assert "| epsilon (largest run's) | - | 8.000 |" in group_h


@pytest.fixture(scope="module")
def committed():
  import json
  import pathlib

  document = json.loads((pathlib.Path(__file__).resolve().parents[1] / "docs" / "study_privacy.json").read_text())
  return {(c["group"], c["method"], c["setting"]): c for c in document["cells"]}


def test_the_committed_tables_are_the_results_file(study):
  import pathlib

  root = pathlib.Path(__file__).resolve().parents[1]
  args = type("Args", (), {"docs": str(root / "docs"), "benchmarks": str(root / "docs" / "benchmarks.md")})
  assert study.check(args) == 0


def _verdict(a, b):
  """"ahead of" / "behind" / "tied with" of cell a against cell b: the same Welch test as the tables (p < 0.05)."""
  from scipy import stats

  x, y = a["final_accuracy_mean_per_seed"], b["final_accuracy_mean_per_seed"]
  p = stats.ttest_ind(x, y, equal_var=False).pvalue
  return "tied with" if not p < 0.05 else ("ahead of" if sum(x) / len(x) > sum(y) / len(y) else "behind")


def _mean(cell):
  return round(sum(cell["final_accuracy_mean_per_seed"]) / len(cell["final_accuracy_mean_per_seed"]), 3)


def test_the_privacy_reading_holds_on_the_committed_results(committed):
  # docs/benchmarks.md, "Privacy and unreliable clients", statement by statement.
  methods = ("fedspa", "fedavg", "ditto", "subfedavg")
  # 100 clients, adaptive clip: every method diverged at every epsilon, in round 2 or 3
  for method in methods:
    for setting in ("eps8", "eps4", "eps1"):
      cell = committed[("fashion_mnist", method, setting)]
      assert cell["status"] == "diverged" and cell["diverged"]["round"] in (2, 3), (method, setting)
  # the fixed clip: FedSpa 0.324 (0.844), FedAvg 0.451 (0.822), each lower than without DP
  clip = {m: committed[("fashion_mnist_clip0.05", m, "eps8")] for m in methods}
  none = {m: committed[("fashion_mnist", m, "none")] for m in methods}
  assert (_mean(clip["fedspa"]), _mean(none["fedspa"]), _mean(clip["fedavg"]), _mean(none["fedavg"])) == (
      0.324, 0.844, 0.451, 0.822)
  assert all(_verdict(clip[m], none[m]) == "behind" for m in methods)
  assert max(e for c in clip.values() for e in c["dp_epsilon_per_seed"]) <= 8.0
  # Ditto's personal models 0.799 (0.862), Sub-FedAvg's own networks 0.802 (0.863): tied with each other, ahead of
  # FedAvg and FedSpa; FedSpa behind FedAvg
  assert (_mean(clip["ditto"]), _mean(none["ditto"])) == (0.799, 0.862)
  assert (_mean(clip["subfedavg"]), _mean(none["subfedavg"])) == (0.802, 0.863)
  assert _verdict(clip["ditto"], clip["subfedavg"]) == "tied with"
  assert all(_verdict(clip[p], clip[m]) == "ahead of" for p in ("ditto", "subfedavg") for m in ("fedavg", "fedspa"))
  assert _verdict(clip["fedspa"], clip["fedavg"]) == "behind"
  # 10,000 clients: FedAvg 0.581 against 0.685 (lower), FedSpa 0.473 against 0.510 (tied); FedSpa behind FedAvg in both
  many = {(m, s): committed[("synthetic_iid", m, s)] for m in ("fedspa", "fedavg") for s in ("none", "eps4")}
  assert (_mean(many["fedavg", "eps4"]), _mean(many["fedavg", "none"])) == (0.581, 0.685)
  assert (_mean(many["fedspa", "eps4"]), _mean(many["fedspa", "none"])) == (0.473, 0.510)
  assert _verdict(many["fedavg", "eps4"], many["fedavg", "none"]) == "behind"
  assert _verdict(many["fedspa", "eps4"], many["fedspa", "none"]) == "tied with"
  assert all(_verdict(many["fedspa", s], many["fedavg", s]) == "behind" for s in ("none", "eps4"))


def test_the_dropout_reading_holds_on_the_committed_results(committed):
  methods = ("fedspa", "fedavg", "ditto", "subfedavg")
  cell = lambda m, s: committed[("fashion_mnist", m, s)]
  # the same draws for every method: 130, 129, 114 of 400 at 0.3; 262, 237, 229 at 0.6
  for setting, dropped in (("drop0.3", [130, 129, 114]), ("drop0.6", [262, 237, 229])):
    assert all(cell(m, setting)["clients_dropped_per_seed"] == dropped for m in methods
               if cell(m, setting)["status"] == "complete")
  assert all(_verdict(cell(m, "drop0.3"), cell(m, "none")) == "tied with" for m in methods)
  # at 0.6: Sub-FedAvg 0.876 and FedAvg 0.782 tied with their runs without dropouts (0.822 for FedAvg)
  assert (_mean(cell("subfedavg", "drop0.6")), _mean(cell("fedavg", "drop0.6"))) == (0.876, 0.782)
  assert all(_verdict(cell(m, "drop0.6"), cell(m, "none")) == "tied with" for m in ("subfedavg", "fedavg", "fedspa"))
  # FedSpa's seed 2 collapsed in round 30 (0.119, loss 5.6), 0.420 at round 40; seeds 1 and 3 0.801 and 0.842
  fedspa = cell("fedspa", "drop0.6")
  assert fedspa["seeds"] == [1, 2, 3]
  assert [[r, round(a, 3), round(l, 1)] for r, a, l in fedspa["history_per_seed"][1][2:]] == [
      [30, 0.119, 5.6], [40, 0.42, 0.7]]
  assert [round(a, 3) for a in fedspa["final_accuracy_mean_per_seed"]] == [0.801, 0.42, 0.842]
  assert (_mean(fedspa), round(float(__import__("numpy").std(fedspa["final_accuracy_mean_per_seed"])), 3)) == (
      0.687, 0.19)
  # Ditto diverged in round 30, seed 1
  assert cell("ditto", "drop0.6")["status"] == "diverged"
  assert cell("ditto", "drop0.6")["diverged"] == {"seed": 1, "round": 30}
