"""The benchmark tools that write documents: ``benchmarks.run.splice`` (``--only`` replaces its
benchmarks' rows of BENCHMARKS.md and keeps the rest) and the SAM-family table's arithmetic."""

import math

from benchmarks import run, sam_family_table

DOCUMENT = """# Benchmarks

Prose before.

| benchmark | case | value | unit | goal | ok | note |
|---|---|---|---|---|---|---|
| alpha | a1 | 1 | x |  | – | old |
| beta | b1 | 2 | x |  | – | kept |
| alpha | a2 | 3 | x |  | – | old |

## The misses

Prose after.
"""


def row(benchmark, case, value):
  return {"benchmark": benchmark, "case": case, "value": value, "unit": "x", "goal": "",
          "ok": None, "note": "new"}


def test_splice_replaces_the_rows_of_the_benchmarks_measured_again():
  out = run.splice(DOCUMENT, [row("alpha", "a3", 4.0), row("gamma", "g1", 5.0)])
  lines = out.split("\n")
  table = [l for l in lines if l.startswith("| ")]
  assert table[1:] == ["| alpha | a3 | 4 | x |  | – | new |",
                       "| gamma | g1 | 5 | x |  | – | new |",
                       "| beta | b1 | 2 | x |  | – | kept |"]
  assert "Prose before." in out and out.endswith("Prose after.\n")


def test_splice_appends_new_benchmarks_at_the_end_of_the_table():
  out = run.splice(DOCUMENT, [row("delta", "d1", 6.0)])
  table = [l for l in out.split("\n") if l.startswith("| ")]
  assert table[-1] == "| delta | d1 | 6 | x |  | – | new |" and len(table) == 5


def test_table_spread_and_step_time_over_sgd():
  runs = lambda accs, t: [{"test_accuracy": a, "generalization_gap": 0.5, "accuracy_gap": 0.2,
                           "step_time_s": t} for a in accs]
  text = sam_family_table.table({"sgd": runs([0.6, 0.7], 0.001), "csam": runs([0.7], 0.003)})
  lines = text.split("\n")
  std = math.sqrt(((0.6 - 0.65) ** 2 + (0.7 - 0.65) ** 2) / 1)   # ddof = 1
  assert lines[2].startswith(f"| SGD | 0.650 ± {std:.3f} | 0.500 ± 0.000 | 0.200 ± 0.000 | 1.00 |")
  assert lines[3] == "| CSAM identity | 0.700 ± 0.000 | 0.500 ± 0.000 | 0.200 ± 0.000 | 3.00 |"


def test_splice_with_cases_replaces_only_those_cases_rows():
  """``--cases``: a run of some of a benchmark's cases keeps the rows of its other cases."""
  out = run.splice(DOCUMENT, [row("alpha", "a1, again", 7.0)], cases=("a1",))
  table = [l for l in out.split("\n") if l.startswith("| ")]
  assert table[1:] == ["| alpha | a1, again | 7 | x |  | – | new |",
                       "| beta | b1 | 2 | x |  | – | kept |",
                       "| alpha | a2 | 3 | x |  | – | old |"]
