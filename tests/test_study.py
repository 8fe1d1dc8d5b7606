"""The Fashion-MNIST study driver (scripts/study_fashion_mnist.py) and its report: input checks, the plan's order,
resuming (finished units skipped, interrupted and failed ones rerun), lr selection, the lock, and the report on a
synthetic study folder. No training: units run through a fake runner."""

import json
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest
from script_loader import load as _load

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"



study = _load("study_fashion_mnist")
report = _load("study_report")

CELLS = (("pathological", "fedspa"), ("pathological", "fedspa_random"), ("pathological", "fedavg"))
PLAN = study.Plan(lrs=(0.01, 0.1), seeds=(1, 2), cells=CELLS, smoke=True, rounds=2, search_rounds=1, eval_every=1)


@pytest.mark.parametrize("args, message", [
    (["--lrs", "0.01", "-0.1"], "learning rates must be finite numbers > 0, got -0.1"),
    (["--lrs", "0.01", "0"], "learning rates must be finite numbers > 0, got 0.0"),
    (["--lrs", "nan"], "learning rates must be finite numbers > 0"),
    (["--lrs", "0.1", "0.1"], "the learning-rate grid repeats a value"),
    (["--lrs"], "the learning-rate grid is empty"),
    (["--seeds"], "at least one seed"),
    (["--seeds", "1", "2", "1"], "seeds must be distinct; repeated: 1"),
    (["--seeds", "-1"], "seeds must be integers >= 0"),
    (["--seeds", "0", "1"], "the lr-search seed 0 is also a final seed"),
    (["--rounds", "50"], "at least 100 rounds and 2 local epochs"),
    (["--local-epochs", "1"], "at least 100 rounds and 2 local epochs"),
    (["--rounds", "100", "--search-rounds", "200"], "search-rounds (200) exceeds rounds (100)"),
    (["--cells", "pathological/fedspa_random"], "takes its lr from pathological/fedspa, which must come before it"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, capsys):
  assert study.main(["run", "--out", str(tmp_path / "s"), *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("study_fashion_mnist: error: ") and message in err and err.count("\n") == 1
  assert not (tmp_path / "s").exists()  # nothing written, nothing run


def test_bad_input_fails_before_jax_is_imported():
  code = ("import sys; sys.argv = ['x', 'run', '--lrs', '0.1', '-1']; sys.path.insert(0, %r); "
          "import study_fashion_mnist as s; rc = s.main(); assert 'jax' not in sys.modules; sys.exit(rc)") % str(SCRIPTS)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip() == "study_fashion_mnist: error: learning rates must be finite numbers > 0, got -1.0"


def test_plan_order_and_sizes():
  core = study.plan_units(study.Plan())
  assert len(core) == 9 * 4  # 9 cells, each 3 lr units and a final unit
  assert [str(u).split()[1] for u in core[:4]] == ["pathological/fedspa"] * 4
  assert core[3].kind == "final" and {u.partition for u in core[:20]} == {"pathological"}
  full = study.plan_units(study.Plan(cells=study.TIERS["all"]))
  assert full[:36] == core and full[36].path == "lr_search/dirichlet/fedrep/lr_0.01"  # the core tier comes first
  assert len(full) == 19 + 14 * 3  # 19 cells; FedSpa's 5 ablations reuse its lr (no search of their own)
  for i, unit in enumerate(full):
    if unit.kind == "final":  # every lr unit it depends on comes first
      source = study.lr_source(unit.variant)
      needed = {study.Unit("lr", unit.partition, source, lr) for lr in study.Plan.lrs}
      assert needed <= set(full[:i])
  assert len({u.path for u in full}) == len(full)


def test_config_of_a_unit():
  plan = study.Plan()
  lr_cfg = study.make_config(plan, study.Unit("lr", "dirichlet", "fedavg", 0.03), 0.03)
  assert (lr_cfg.algorithm, lr_cfg.partition, lr_cfg.data_args["alpha"]) == ("fedavg", "dirichlet", 0.3)
  assert (lr_cfg.rounds, lr_cfg.seed, lr_cfg.eval_every, lr_cfg.eval_clients) == (30, 0, 10, None)
  assert lr_cfg.hparams["lr"] == 0.03 and lr_cfg.hparams["momentum"] == 0.0 and lr_cfg.hparams["local_epochs"] == 2
  assert "density" not in lr_cfg.hparams and lr_cfg.num_clients == 100 and lr_cfg.hparams["clients_per_round"] == 10
  final = study.make_config(plan, study.Unit("final", "pathological", "fedspa_d0.2"), 0.1)
  assert (final.algorithm, final.rounds, final.hparams["density"], final.hparams["lr"]) == ("fedspa", 100, 0.2, 0.1)
  assert final.data_args["classes_per_client"] == 2 and final.model == "lenet5"


class FakeRunner:
  """Accuracy from the lr (0.1 best), records the units it ran; optionally interrupts or fails at given calls."""

  def __init__(self, interrupt_at=None, fail=(), accuracy=None):
    self.ran, self.interrupt_at, self.fail = [], interrupt_at, set(fail)
    self.accuracy = accuracy or (lambda unit, lr: {0.01: 0.5, 0.1: 0.7}[lr])

  def __call__(self, plan, unit, config, workdir):
    if self.interrupt_at is not None and len(self.ran) == self.interrupt_at:
      raise KeyboardInterrupt  # a killed session
    self.ran.append(unit.path)
    if unit.path in self.fail:
      raise RuntimeError("boom")
    acc = self.accuracy(unit, config.hparams["lr"])
    return {"status": "complete" if acc is not None else "diverged", "final_accuracy_mean": acc}


def test_resume_skips_finished_units_and_reruns_the_interrupted_one(tmp_path):
  out = tmp_path / "study"
  first = FakeRunner(interrupt_at=3)
  with pytest.raises(KeyboardInterrupt):
    study.run_study(PLAN, out, first)
  assert first.ran == ["lr_search/pathological/fedspa/lr_0.01", "lr_search/pathological/fedspa/lr_0.1",
                       "final/pathological/fedspa"]
  assert study.drivers(out) == []  # the lock went with the process
  second = FakeRunner()
  assert study.run_study(PLAN, out, second) == 0
  assert second.ran == ["final/pathological/fedspa_random", "lr_search/pathological/fedavg/lr_0.01",
                        "lr_search/pathological/fedavg/lr_0.1", "final/pathological/fedavg"]
  final = json.loads((out / "final/pathological/fedspa_random/unit.json").read_text())
  assert final["lr"] == 0.1 and final["lr_from"] == "fedspa" and final["seeds"] == [1, 2]
  assert final["lr_search"] == {"0.01": 0.5, "0.1": 0.7}
  third = FakeRunner()
  assert study.run_study(PLAN, out, third) == 0 and third.ran == []
  assert "units done: 7 of 7" in study.status_text(PLAN, out)


def test_a_failed_unit_is_recorded_the_rest_go_on_and_it_is_retried(tmp_path):
  out = tmp_path / "study"
  runner = FakeRunner(fail={"lr_search/pathological/fedspa/lr_0.1"})
  assert study.run_study(PLAN, out, runner) == 1
  assert "boom" in (out / "lr_search/pathological/fedspa/lr_0.1/failed.txt").read_text()
  assert "final/pathological/fedspa" not in runner.ran  # its lr search is incomplete
  assert runner.ran[-1] == "final/pathological/fedavg"
  text = study.status_text(PLAN, out)
  assert "units done: 4 of 7" in text and "FAIL" in text
  retry = FakeRunner()
  assert study.run_study(PLAN, out, retry) == 0
  assert retry.ran == ["lr_search/pathological/fedspa/lr_0.1", "final/pathological/fedspa",
                       "final/pathological/fedspa_random"]


def test_lr_selection_ties_and_divergence(tmp_path):
  out = tmp_path / "study"
  plan = study.Plan(lrs=(0.01, 0.03, 0.1), seeds=(1,), cells=CELLS[:1], smoke=True, rounds=2, search_rounds=1)
  accs = {0.01: 0.6, 0.03: 0.6, 0.1: None}  # a tie, and a diverged run
  study.run_study(plan, out, FakeRunner(accuracy=lambda unit, lr: accs[lr] if unit.kind == "lr" else 0.7))
  lr, table = study.select_lr(plan, out, "pathological", "fedspa")
  assert lr == 0.01 and table == {"0.01": 0.6, "0.03": 0.6, "0.1": None}
  out2 = tmp_path / "all_diverged"
  runner = FakeRunner(accuracy=lambda unit, lr: None)
  assert study.run_study(plan, out2, runner) == 0
  assert "final/pathological/fedspa" not in runner.ran
  assert study.unit_state(plan, out2, study.Unit("final", "pathological", "fedspa")) == "failed"


def test_drivers_share_a_folder_by_unit_locks_and_the_plan_is_pinned(tmp_path, capsys):
  out = tmp_path / "study"
  other = study.driver_lock(out, pid=999999)  # another driver, as seen from this process
  busy = study.unit_lock(out, study.Unit("lr", "pathological", "fedspa", 0.1))
  assert other.acquire() and busy.acquire()
  try:
    assert study.drivers(out) == ["999999"]
    assert "running: driver pid 999999, between units" in study.status_text(PLAN, out)
    assert study.main(["check", "--out", str(out)]) == 3  # `start` stops here: drivers already run on the folder
    # The unit the other driver holds is skipped; its cell's final units wait, polling, until it is released.
    threading.Timer(0.5, busy.release).start()
    runner = FakeRunner()
    assert study.run_study(PLAN, out, runner, poll_s=0.05) == 0
    assert runner.ran[:3] == ["lr_search/pathological/fedspa/lr_0.01", "lr_search/pathological/fedavg/lr_0.01",
                              "lr_search/pathological/fedavg/lr_0.1"]
    assert runner.ran[3] == "final/pathological/fedavg"
    # Released but never run by its holder: this driver runs it, then the final units it unblocked.
    assert runner.ran[4:] == ["lr_search/pathological/fedspa/lr_0.1", "final/pathological/fedspa",
                              "final/pathological/fedspa_random"]
    assert study.drivers(out) == ["999999"]  # this driver's own lock went with it
  finally:
    busy.release()
    other.release()
  assert study.drivers(out) == []
  assert study.run_study(PLAN, out, FakeRunner()) == 0
  args = ["run", "--out", str(out), "--smoke", "--lrs", "0.01", "0.1", "--seeds", "1", "2", "--rounds", "2"]
  assert study.main(args + ["--search-rounds", "2"], runner=FakeRunner()) == 2
  assert "holds a study with another plan (differs in search_rounds)" in capsys.readouterr().err
  other_cells = FakeRunner()  # other cells of the same plan: allowed, the finished units are shared
  assert study.main(args + ["--cells", "pathological/fedavg"], runner=other_cells) == 0 and other_cells.ran == []


def _fake_final(out, partition, variant, lr, accs, flops):
  unit = study.Unit("final", partition, variant)
  for s, acc in zip((1, 2), accs):
    folder = out / unit.path / f"seed_{s}"
    folder.mkdir(parents=True)
    summary = {"rounds": 2, "final_accuracy": {"mean": acc, "worst10": acc - 0.2},
               "final_accuracy_participating": {"mean": acc + 0.01}, "clients_participating": 4,
               "bytes_up": 2 * 2**20, "bytes_down": 4 * 2**20, "bytes_total": 6 * 2**20, "flops": flops}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "accuracy_mean": acc * r / 2}) + "\n" for r in (1, 2)))
  study.write_json_atomic(out / unit.path / "unit.json", {"status": "complete", "seeds": [1, 2], "lr": lr,
                                                          "final_accuracy_mean": float(np.mean(accs))})


def test_report_on_a_partial_study(tmp_path, monkeypatch):
  monkeypatch.setattr(report, "VERDICT", tmp_path / "no_verdict.md")  # not the repository's hand-written one
  out = tmp_path / "study"
  study.run_study(PLAN, out, FakeRunner(accuracy=lambda unit, lr: {0.01: 0.5, 0.1: 0.7}[lr] if unit.kind == "lr"
                                        else 0.7))
  for variant, accs, flops in (("fedspa", (0.8, 0.9), 5e11), ("fedavg", (0.6, 0.7), 1e12)):
    _fake_final(out, "pathological", variant, 0.1, accs, flops)
  section = report.report(out, tmp_path / "img", "img")
  assert section.startswith(report.BEGIN) and section.endswith(report.END)
  fedspa_row = next(line for line in section.splitlines() if line.startswith("| FedSpa (d=0.5) |"))
  assert "| 0.1 | 0.8500 ± 0.0500 | 0.8600 ± 0.0500 | 0.650 | 4 | 1.00 | 2.00 | 0.500 | 0.50 |" in fedspa_row
  ditto_row = next(line for line in section.splitlines() if line.startswith("| Ditto |"))
  assert ditto_row.count(report.MISSING) >= 9  # nothing finished: marked, not dropped
  assert "**0.7000**" in section and "Placeholder: no verdict yet" in section
  assert (tmp_path / "img" / "study_fashion_mnist_accuracy_vs_rounds.png").stat().st_size > 0
  assert (tmp_path / "img" / "study_fashion_mnist_accuracy_vs_bytes.png").stat().st_size > 0
  docs = tmp_path / "bench.md"
  docs.write_text("# B\n\nintro\n\n## FedSpa against the baselines on Fashion-MNIST\n\nold\n")
  report.update_docs(docs, section)
  report.update_docs(docs, section.replace("Placeholder", "Still a placeholder"))
  text = docs.read_text()
  assert text.count(report.BEGIN) == 1 and "Still a placeholder" in text and text.index(report.BEGIN) < text.index("old")
  # A verdict written by hand replaces the placeholder, and survives regenerating the section.
  (tmp_path / "no_verdict.md").write_text("FedSpa wins here, loses there.\n")
  section = report.report(out, tmp_path / "img", "img")
  assert "FedSpa wins here, loses there." in section and "Placeholder" not in section


def test_edge_check_runs_one_step_past_the_grid_and_the_report_shows_it(tmp_path, monkeypatch):
  monkeypatch.setattr(report, "VERDICT", tmp_path / "no_verdict.md")
  out = tmp_path / "study"
  accs = {0.01: 0.5, 0.1: 0.7, 0.3: 0.75, 0.001: 0.1}
  # FedSpa (and its ablation, which takes FedSpa's lr) at the top edge, FedAvg at the bottom edge.
  pick = lambda unit, lr: (accs[lr] if unit.variant == "fedspa" else 1 - accs[lr]) if unit.kind == "lr" else 0.7
  study.run_study(PLAN, out, FakeRunner(accuracy=pick))
  assert [u.path for u in study.edge_units(PLAN, out)] == ["lr_search/pathological/fedspa/lr_0.3",
                                                          "lr_search/pathological/fedavg/lr_0.00333333"]
  accs[0.00333333] = 0.6
  runner = FakeRunner(accuracy=pick)
  assert study.main(["edge", "--out", str(out)], runner=runner) == 0
  assert runner.ran == ["lr_search/pathological/fedspa/lr_0.3", "lr_search/pathological/fedavg/lr_0.00333333"]
  assert study.select_lr(PLAN, out, "pathological", "fedspa")[0] == 0.1  # the selection does not change
  assert "units done: 7 of 7" in study.status_text(PLAN, out)  # nor the plan
  section = report.report(out, tmp_path / "img", "img")
  assert "| pathological | FedSpa (d=0.5) (at the grid's edge) | 0.5000 | **0.7000** | lr 0.3: 0.7500 |" in section
  assert "| pathological | FedAvg (at the grid's edge) | **0.5000** | 0.3000 | lr 0.00333333: 0.4000 |" in section
  assert study.main(["edge", "--out", str(tmp_path / "none")]) == 2


def test_mask_overlap_by_shared_classes(tmp_path):
  out = tmp_path / "study"
  unit = study.Unit("final", "pathological", "fedspa")
  folder = out / unit.path / "seed_1"
  folder.mkdir(parents=True)
  # Clients 0 and 1 share both classes, 0 and 2 one, 1 and 2 one, 3 shares none with anyone; 10 active weights each.
  labels = np.zeros((4, 10), int)
  labels[0, [0, 1]] = labels[1, [0, 1]] = labels[2, [1, 2]] = labels[3, [5, 6]] = 7
  hamming = np.array([[0, 2, 6, 20], [2, 0, 8, 20], [6, 8, 0, 20], [20, 20, 20, 0]])
  np.savez(folder / "clients.npz", hamming=hamming, active=np.full(4, 10), label_counts=labels)
  cell = {"partition": "pathological", "variant": "fedspa", "record": {"seeds": [1]}, "seeds": [{}]}
  table = report.mask_overlap_table(out, [cell])
  row = table.splitlines()[-1]
  # sharing 2: 1 - 2/20; sharing 1: mean(1 - 6/20, 1 - 8/20); sharing 0: 0 (disjoint masks)
  assert row.startswith("| FedSpa (d=0.5) | 0.000 | 0.650 | 0.900 | ")
  assert float(row.split("|")[5]) == pytest.approx(report.random_overlap("fedspa"), abs=1e-3)
  assert 0.5 < report.random_overlap("fedspa") < 0.6 and report.random_overlap("fedspa_uniform") == pytest.approx(0.5)


def test_lrs_that_would_share_a_unit_folder_are_refused(tmp_path, capsys):
  assert study.main(["run", "--out", str(tmp_path / "s"), "--lrs", "0.1", "0.1000001"]) == 2  # both lr_0.1
  assert "repeats a value (to 6 significant digits)" in capsys.readouterr().err
  assert not (tmp_path / "s").exists()


def test_the_protocol_rerun_uses_the_selected_lrs_and_scores_every_protocol(tmp_path):
  command, plan, out, _ = study.parse_plan(["run", "--protocols"])
  assert out == pathlib.Path(study.PROTOCOLS_OUT) and plan.cells == study.TIERS["protocols"]
  units = study.plan_units(plan)
  assert all(u.kind == "final" for u in units) and len(units) == 14  # no lr search: the old selection
  for partition, variant in plan.cells:
    lr, _ = study.select_lr(plan, tmp_path, partition, variant)
    assert lr == study.SELECTED_LRS[f"{partition}/{study.lr_source(variant)}"]
    config = study.make_config(plan, study.Unit("final", partition, variant), lr)
    assert config.eval_finetune_epochs == 1 and config.hparams["lr"] == lr
    assert config.hparams.get("personal_model") == ("local" if variant.startswith("fedspa") else None)
  assert study.unit_state(plan, tmp_path, units[0]) == "todo"  # nothing waits on a search


def test_protocol_report_reads_every_protocol(tmp_path):
  protocol_report = _load("protocol_report")
  out = tmp_path / "study"
  stats = lambda m: {k: {"mean": m, "std": 0.01} for k in ("mean", "worst10")}
  for variant in ("fedspa", "ditto"):
    unit = out / "final" / "pathological" / variant
    unit.mkdir(parents=True)
    summary = {"status": "complete", "rounds": 100, "final_accuracy": stats(0.9 if variant == "fedspa" else 0.95),
               "final_accuracy_finetuned": stats(0.96), "bytes_up": {"mean": 100 * 2**20}, "flops": {"mean": 2e12},
               "eval_flops": {"mean": 3e11}}
    if variant == "fedspa":
      summary.update(final_accuracy_masked_global=stats(0.8), final_accuracy_finetuned_masked_global=stats(0.85))
    (unit / "summary.json").write_text(json.dumps(summary))
    (unit / "unit.json").write_text(json.dumps({"lr": 0.1, "status": "complete", "seeds": [1],
                                                "finished_at": "2026-12-02T04:00:00"}))
    seed = unit / "seed_1"
    seed.mkdir()
    labels = np.array([[5, 5, 0], [5, 0, 5], [0, 5, 5]])  # pairs share 1 class each
    models = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    distance = np.linalg.norm(models[:, None] - models[None], axis=-1)
    np.savez(seed / "clients.npz", model_distance=distance, model_norm=np.linalg.norm(models, axis=1),
             label_counts=labels, participation=np.ones(3, int))
  section = protocol_report.report(out)
  fedspa_global = next(l for l in section.splitlines() if l.startswith("| FedSpa (d=0.5), m_k"))
  assert "| 0.1 | 0.8000 ± 0.0100 | 0.8500 ± 0.0100 | 0.800 / 0.850 | 0.9403 | 1.00 | 2.000 | 0.300 |" in fedspa_global
  fedspa_local = next(l for l in section.splitlines() if l.startswith("| FedSpa (d=0.5), its local"))
  assert "| 0.9000 ± 0.0100 | 0.9600 ± 0.0100 |" in fedspa_local
  assert next(l for l in section.splitlines() if l.startswith("| Local, own")).count(protocol_report.MISSING) >= 8
  ditto = next(l for l in section.splitlines() if l.startswith("| Ditto models"))
  spread = (np.sqrt(2) + 2 * np.sqrt(5)) / 3 / np.mean([1.0, 1.0, np.sqrt(8)])  # mean pair distance / mean norm
  assert f"| {spread:.3f} | · | {spread:.3f} | · |" in ditto
