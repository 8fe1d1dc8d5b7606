"""scripts/sparse_family_report.py (issue 29): the run folder -> per-seed results file -> the docs' rows, and the study
driver's --sparse-family plan."""

import json
import pathlib
import shutil

import pytest
from script_loader import load as _load



@pytest.fixture(scope="module")
def report():
  return _load("sparse_family_report")


def _seed_summary(mean, worst, tuned, tuned_worst, rounds=100):
  # The fields experiment.run writes into seed_<s>/summary.json that the report reads.
  return {"rounds": rounds, "num_clients": 100, "model": "lenet5",
          "hparams": {"clients_per_round": 10, "local_epochs": 2, "local_steps": None, "batch_size": 32},
          "final_accuracy": {"mean": mean, "worst10": worst},
          "final_accuracy_finetuned": {"mean": tuned, "worst10": tuned_worst},
          "bytes_up": 100 * 2**20, "bytes_down": 200 * 2**20, "flops": 3e12, "eval_flops": 2e11,
          "client_store_bytes_per_client": 1000.0, "device": "cpu", "jax_version": "0"}


def _study_folder(root: pathlib.Path, report) -> pathlib.Path:
  study = report.study
  (root / "plan.json").write_text(json.dumps({"rounds": 100, "local_epochs": 2, "seeds": [1, 2, 3],
                                              "lrs": [0.01, 0.03, 0.1], "search_seed": 0, "search_rounds": 30}))
  unit_dir = root / study.Unit("final", "pathological", "dispfl").path
  for s, (m, t) in zip((1, 2, 3), ((0.90, 0.95), (0.91, 0.96), (0.92, 0.97))):
    (unit_dir / f"seed_{s}").mkdir(parents=True)
    (unit_dir / f"seed_{s}" / "summary.json").write_text(json.dumps(_seed_summary(m, m - 0.2, t, t - 0.1)))
  (unit_dir / "unit.json").write_text(json.dumps({
      "status": "complete", "seeds": [1, 2, 3], "lr": 0.1, "lr_search": {"0.1": 0.8}, "wall_time_run": 250.0,
      "finished_at": "2026-12-07T07:00:00"}))
  # the edge check one step above the grid's top (0.1 x 3), which the report shows beside the selection
  edge = root / study.Unit("lr", "pathological", "dispfl", 0.3).path
  edge.mkdir(parents=True)
  (edge / "unit.json").write_text(json.dumps({"status": "complete", "final_accuracy_mean": 0.7}))
  # an unfinished unit is left out, not reported as a zero
  (root / study.Unit("final", "dirichlet", "dispfl").path).mkdir(parents=True)
  return root


def test_collect_keeps_per_seed_values_and_per_round_costs(report, tmp_path):
  results = report.collect(_study_folder(tmp_path, report))
  (cell,) = results["cells"]
  assert (cell["split"], cell["method"], cell["lr"]) == ("pathological", "DisPFL", 0.1)
  assert cell["lr_edge"] == {"0.3": 0.7}
  assert cell["as_scored"] == [0.90, 0.91, 0.92] and cell["finetuned"] == [0.95, 0.96, 0.97]
  assert cell["worst10"] == pytest.approx([0.70, 0.71, 0.72])
  assert cell["mib_up_per_round"] == 1.0 and cell["mib_down_per_round"] == 2.0  # 100 MiB / 100 rounds
  assert cell["train_tflops"] == 3.0 and cell["seconds_per_round"] == 2.5
  assert "100 clients, 10 per round, lenet5, 100 rounds of 2 local epochs at batch 32" in results["study"]


def test_verdict_rows_by_welch_against_fedspas_local_model(report):
  # FedSpa's local model on pathological, as scored: 0.9660 ± 0.0013 (population std) over 3 seeds in the protocol
  # results file. [0.90, 0.91, 0.92] is 5 points below with a sample std of 0.01: t = 0.056 / sqrt(0.01^2 / 3 +
  # 0.0016^2 / 3) = 9.6 on ~2.1 degrees of freedom (Welch-Satterthwaite); the two-sided 1% point at 2 df is 9.92, so
  # p is about 0.01, far below 0.05: "behind".
  # Equal to FedSpa's seeds (mean 0.966, population std 0.0013): "tied".
  subject_like = [0.966 - 0.0013 * 1.5 ** 0.5, 0.966, 0.966 + 0.0013 * 1.5 ** 0.5]
  results = {"cells": [
      {"split": "pathological", "method": "DisPFL", "as_scored": [0.90, 0.91, 0.92], "finetuned": [0.95, 0.96, 0.97],
       "worst10": [0.7] * 3, "worst10_finetuned": [0.8] * 3},
      {"split": "pathological", "method": "FedDST", "as_scored": subject_like, "finetuned": [0.967, 0.968, 0.969],
       "worst10": [0.7] * 3, "worst10_finetuned": [0.8] * 3},
  ]}
  rows = {line.split(" | ")[0].strip("| "): line for line in report.verdict_rows(results).splitlines()
          if line.startswith("| ")}
  dispfl, feddst, prunefl = rows["DisPFL"].split(" | "), rows["FedDST"].split(" | "), rows["PruneFL"].split(" | ")
  # p from scipy directly, on the subject's cell as the protocol results file keeps it (mean, population std, n = 3)
  from scipy import stats

  subject = json.loads(report.BESIDE.read_text())["cells"]
  subject = next(c for c in subject if (c["split"], c["protocol"], c["method"]) ==
                 ("pathological", "as_scored", "FedSpa, its local model"))
  assert (subject["mean"], subject["std"], subject["n"]) == (0.966, 0.0013, 3)
  # subject_like: three seeds with exactly that mean and population std
  p = stats.ttest_ind([0.90, 0.91, 0.92], subject_like, equal_var=False).pvalue
  assert 0.005 < p < 0.02
  assert f"0.910 ± 0.008: behind (p = {p:.2g})" in dispfl[1]
  assert ": tied (p = 1)" in feddst[1]
  assert all(c.strip("| ") == "·" for c in prunefl[1:])  # no results: a dot, not a verdict
  assert all(c.strip("| ") == "·" for c in dispfl[3:])  # no Dirichlet cell


def test_check_fails_until_the_docs_are_written_from_the_results(report, tmp_path, monkeypatch):
  docs = tmp_path / "docs"
  shutil.copytree(report.BENCHMARKS.parent, docs, ignore=shutil.ignore_patterns("img"))
  monkeypatch.setattr(report, "BENCHMARKS", docs / "benchmarks.md")
  monkeypatch.setattr(report, "VERDICT", docs / "protocol_verdict.md")
  (tmp_path / "study").mkdir()
  results = report.collect(_study_folder(tmp_path / "study", report))
  path = tmp_path / "results.json"
  path.write_text(json.dumps(results))
  assert report.main(["--check", "--results", str(path)]) == 1
  assert report.main(["--update-docs", "--results", str(path)]) == 0
  assert report.main(["--check", "--results", str(path)]) == 0
  assert "| 0.1 (edge check: 0.3 0.700 against 0.800) |" in (docs / "benchmarks.md").read_text()
  verdict = (docs / "protocol_verdict.md").read_text()
  assert "| DisPFL | 0.910 ± 0.008: behind" in verdict
  assert verdict.strip() in (docs / "benchmarks.md").read_text()  # the protocol section's copy follows
  results["cells"][0]["as_scored"][0] = 0.5
  path.write_text(json.dumps(results))
  assert report.main(["--check", "--results", str(path)]) == 1


def test_sparse_family_plan_scores_the_final_runs_fine_tuned_too():
  study = _load("study_fashion_mnist")
  command, plan, out, _ = study.parse_plan(["plan", "--sparse-family"])
  assert str(out) == study.SPARSE_OUT and plan.eval_finetune_epochs == 1
  assert {v for _, v in plan.cells} == {"dispfl", "feddst", "prunefl"} and len(plan.cells) == 6
  assert study.main(["check", "--sparse-family", "--protocols"]) == 2
