"""scripts/protocol_report.py's derived verdict (issue 28): Welch t-tests over seeds, "tied" unless p < 0.05, worst-10%
per split, and --check against docs/protocol_verdict.md."""

import json

import pytest
from script_loader import load


@pytest.fixture(scope="module")
def report():
  return load("protocol_report")


def test_welch_by_hand(report):
  # [1, 2, 3] vs [4, 5, 6]: means 2 and 5, sample stds 1, t = 3 / sqrt(2 / 3) = 3.674 on 4 degrees of freedom; the t
  # distribution's 2.5% and 1% points at 4 df are 2.776 and 3.747, so 0.02 < p < 0.05: separated.
  a, b = {"values": [1.0, 2.0, 3.0]}, {"values": [4.0, 5.0, 6.0]}
  assert 0.02 < report.welch_p(a, b) < 0.05
  assert report.compare(a, b) == "behind" and report.compare(b, a) == "ahead of"
  # Shifted by 0.5: t = 0.612, far from significance.
  assert report.compare(a, {"values": [1.5, 2.5, 3.5]}) == "tied with"
  # A cell kept as mean and population std is the same cell: std sqrt(2 / 3) over 3 seeds is [1, 2, 3]'s.
  assert report.welch_p({"mean": 2.0, "std": (2 / 3) ** 0.5, "n": 3}, b) == pytest.approx(report.welch_p(a, b))


def test_the_wording_the_issue_disputes_is_a_tie(report):
  results = report.read_results(report.RESULTS)
  cell = lambda split, protocol, method: next(c for c in results["cells"] if (c["split"], c["protocol"], c["method"])
                                              == (split, protocol, method))
  me = lambda split, protocol: cell(split, protocol, "FedSpa, its local model")
  assert report.compare(me("pathological", "as_scored"), cell("pathological", "as_scored", "Local")) == "tied with"
  assert report.compare(me("dirichlet", "finetuned"), cell("dirichlet", "finetuned", "FedRep")) == "tied with"
  block = report.verdict_block(results)
  assert "Dirichlet(0.3) 0.732 -> 0.719 (falls)" in block and "pathological (2 classes per client) 0.775 -> 0.810" \
      " (rises)" in block


def test_check_fails_when_docs_and_results_disagree(report, tmp_path):
  assert report.main(["--check"]) == 0  # the committed verdict agrees with the committed results
  results = json.loads(report.RESULTS.read_text())
  next(c for c in results["cells"] if c["method"] == "Local" and c["split"] == "pathological")["mean"] = 0.90
  changed = tmp_path / report.RESULTS.name  # the same name: only the number differs
  changed.write_text(json.dumps(results))
  assert report.main(["--check", "--results", str(changed)]) == 1


def test_one_seed_is_never_ahead(report):
  assert report.compare({"values": [0.9]}, {"values": [0.1]}) == "tied with"  # no test with one seed


def test_the_recipe_studys_per_seed_records_are_read(report, tmp_path):
  records = [{"split": "balanced", "method": m, "seed": s, "accuracy": a, "worst10": w + (s - 2) / 100}
             for m, base, w in (("FedSpa, its local model", 0.9, 0.7), ("FedSpa, m_k ⊙ w", 0.8, 0.6),
                                ("Ditto", 0.9, 0.75)) for s, a in zip((1, 2, 3), (base - 0.01, base, base + 0.01))]
  path = tmp_path / "recipe_study.json"
  path.write_text(json.dumps({"records": records}))
  block = report.verdict_block(report.read_results(path))
  row = next(l for l in block.splitlines() if l.startswith("| the group's split"))
  # local vs m_k ⊙ w: 0.1 apart with sample std 0.01 over 3 seeds each (t = 12.2): ahead; vs Ditto: the same seeds.
  ahead, tied, behind = row.split("| 0.900 ± 0.008 |")[1].rstrip(" |").split(" | ")
  assert ahead.strip().startswith("FedSpa, m_k ⊙ w 0.800 ± 0.008") and behind == "none"
  assert tied == "Ditto 0.900 ± 0.008 (p = 1)"
  assert "0.600 -> 0.700 (rises, p = " in block  # worst 10% per seed: 0.59-0.61 against 0.69-0.71
