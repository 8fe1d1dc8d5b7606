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


def _record(split, method, seed, accuracy, bytes_total, flops, rounds=100, age=None):
  return {"split": split, "method": method, "seed": seed, "rounds": rounds, "accuracy": accuracy, "worst10": 0.5,
          "bytes_total": bytes_total, "flops": flops, "eval_flops": 1e12 * seed, "staleness_mean": age, "staleness_max": None if age is None
          else 3 * age}


def test_the_recipe_block_has_costs_and_says_what_is_missing(report, tmp_path):
  mib = 2**20
  records = [
      # FedSpa, both of its protocols from one run: 2 MiB a round over 100 rounds, 5 TFLOPs; local models 9 and 10
      # rounds old on average, at most 27 and 30.
      *[_record("balanced", m, s, 0.9, 200 * mib, 5e12, age=8 + s) for s in (1, 2)
        for m in ("FedSpa, its local model", "FedSpa, m_k ⊙ w")],
      # FedAvg: 4 MiB a round and 8 TFLOPs (FedSpa's shares 0.50x and 0.62x), all 3 seeds; a 50-round run is ignored.
      *[_record("balanced", m, s, 0.85, 400 * mib, 8e12) for s in (1, 2, 3) for m in ("FedAvg, w", "FedAvg-FT")],
      _record("balanced", "FedAvg, w", 1, 0.1, 1, 1, rounds=50),
      # Local: nothing sent.
      {**_record("balanced", "Local", 1, 0.8, 0, 50e12), "eval_flops": None},
  ]
  path = tmp_path / "recipe_study.json"
  path.write_text(json.dumps({"records": records}))
  block, markers = report.derived_block(report.read_results(path))
  assert markers == (report.RECIPE_BEGIN, report.RECIPE_END)
  cells = [[c.strip() for c in l.strip("|").split("|")] for l in block.splitlines()]
  rows = {c[1]: c[2:] for c in cells if c[0].startswith("the group's split") and len(c) == 9}
  # evaluation FLOPs: 1, 2, 3 T for seeds 1, 2, 3 (means 1.5 and 2); a record without them (older files) shows ·
  assert rows["FedSpa, its local model / FedSpa, m_k ⊙ w"] == ["2", "2.00", "1.00x", "5.00", "1.00x", "1.50",
                                                              "9.5 / 30"]
  assert rows["FedAvg, w / FedAvg-FT"] == ["3", "4.00", "0.50x", "8.00", "0.62x", "2.00", ""]
  assert rows["Local"] == ["1", "0.00", "no bytes", "50.00", "0.10x", "·", ""]
  missing = block.split("**Not in the file yet**")[1]
  assert "FedSpa seed 3;" in missing and "Ditto seeds 1, 2, 3" in missing and "Local seeds 2, 3" in missing
  balanced = missing.split("Dirichlet(0.3):")[0].replace("Sub-FedAvg", "")
  assert "FedAvg seed" not in balanced  # all 3 of its 100-round seeds are there
  assert "Dirichlet(0.3): FedSpa seeds 1, 2, 3" in missing


def test_check_holds_the_recipe_block_to_its_file(report, tmp_path):
  assert report.main(["--check", "--results", str(report.RECIPE_RESULTS)]) == 0
  results = json.loads(report.RECIPE_RESULTS.read_text())
  results["records"][0]["flops"] *= 2  # a cost changes, not an accuracy: the block's costs are checked too
  changed = tmp_path / report.RECIPE_RESULTS.name
  changed.write_text(json.dumps(results))
  assert report.main(["--check", "--results", str(changed)]) == 1


# The words README's "Under the reference group's recipes" bullet and docs/protocol_verdict.md's reading of the recipe
# study use, method by method: each must be what the Welch test on the committed per-seed file says. When a new seed
# moves one (Local's remaining units), this fails until the prose is rewritten.
RECIPE_CLAIMS = {
    "balanced": {"Ditto": "tied with", "FedAvg-FT": "tied with", "FedRep": "tied with",
                 "FedSpa, m_k ⊙ w": "tied with", "FedAvg, w": "ahead of", "Sub-FedAvg": "ahead of", "Local": "ahead of"},
    "dirichlet": {"Ditto": "ahead of", "FedAvg, w": "ahead of", "Sub-FedAvg": "tied with",
                  "FedSpa, m_k ⊙ w": "tied with", "FedAvg-FT": "behind", "FedRep": "behind", "Local": "tied with"},
}


def test_the_prose_on_the_recipe_study_says_what_its_file_says(report):
  results = report.read_results(report.RECIPE_RESULTS)
  cells = {(c["split"], c["method"]): c for c in results["cells"]}
  for split, claims in RECIPE_CLAIMS.items():
    me = cells[(split, "FedSpa, its local model")]
    for method, word in claims.items():
      if (split, method) in cells:
        assert report.compare(me, cells[(split, method)]) == word, (split, method)
  readme = (report.VERDICT.parents[1] / "README.md").read_text()
  bullet = readme[readme.index("**Under the reference group's recipes**"):].split("\n- ")[0]
  assert "tied with Ditto, FedAvg-FT and FedRep and ahead of FedAvg and Sub-FedAvg" in " ".join(bullet.split())
  assert "Dirichlet(0.3) (0.918) ahead of Ditto and FedAvg, behind FedAvg-FT" in " ".join(bullet.split())
  assert "Local, training every client every round at 10x FedAvg's FLOPs, is behind FedSpa's local model on the" \
      " group's split (0.890) and tied with it on Dirichlet(0.3)" in " ".join(bullet.split())
  reading = " ".join(report.VERDICT.read_text().split())
  assert "behind FedSpa's local model on the group's split (0.890 ± 0.002, p = 0.0054) and tied with it on" \
      " Dirichlet(0.3)" in reading
  assert "On the group's split FedSpa's local model is tied with Ditto, FedAvg-FT, FedRep and its own m_k ⊙ w, and" \
      " ahead of FedAvg's shared w and of Sub-FedAvg" in reading
  assert "ahead of Ditto at the group's 2 + 3 epochs (0.903, p = 0.022) and of FedAvg (0.864), tied with Sub-FedAvg" \
      " (0.907, p = 0.058) and m_k ⊙ w (0.912), and behind FedAvg-FT (0.930, p = 0.031) and FedRep" in reading
