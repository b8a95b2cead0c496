"""The plot command on small synthetic logdirs: a sweep and a folder of runs each give every
file promised; what it cannot plot is refused in one line."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from nonuniform_jax import plot
from tests import analysis_fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(capsys, *args) -> list[str]:
  assert plot.command(["nonuniform_jax.plot", *args]) == 0
  return capsys.readouterr().out.split()


def _check_files(printed, folder, names):
  assert sorted(printed) == sorted(os.path.join(folder, n) for n in names)
  for name in names:
    data = pathlib.Path(folder, name).read_bytes()
    assert data.startswith(PNG) if name.endswith(".png") else data.strip(), name


def test_sweep(tmp_path, capsys):
  sweep = str(tmp_path)
  analysis_fixtures.write_sweep(sweep)
  printed = _run(capsys, f"--logdir={sweep}", "--num_resamples=50")
  _check_files(printed, sweep, [
      "scatter_lambda_max-lambda_max.png", "scatter_gradient_noise-trace_sigma.png",
      "scatter_wu_nonuniformity-nonuniformity.png", "within_bins.png", "wu_check.png",
      "summary.md", "summary.csv"])
  with open(tmp_path / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6   # three measures against the gap and the test error
  assert {r["target"] for r in rows} == {"generalization_gap", "test_error"}
  assert all(r["num_models"] == "18" and float(r["tau_low"]) <= float(r["tau"]) for r in rows)
  markdown = (tmp_path / "summary.md").read_text()
  for text in ("18 models count, 3 excluded", "diverged at step 7", "unfinished: no summary",
               "missed the training criterion", "## Within bins of lambda_max/lambda_max",
               "## Wu's check", "[wu_check.png](wu_check.png)"):
    assert text in markdown, text


def test_sweep_without_the_measures_of_the_bins_and_wu(tmp_path, capsys):
  """Only the scatter of the measure chosen and the tables; the markdown says what is
  missing."""
  analysis_fixtures.write_sweep(str(tmp_path))
  for path in tmp_path.glob("members/*/summary.json"):
    summary = json.loads(path.read_text())
    summary["measures"] = {k: v for k, v in summary["measures"].items() if k != "lambda_max"}
    path.write_text(json.dumps(summary))
  out = tmp_path / "figures"
  printed = _run(capsys, f"--logdir={tmp_path}", f"--out={out}", "--num_resamples=0",
                 "--measures=gradient_noise/trace_sigma")
  _check_files(printed, str(out), ["scatter_gradient_noise-trace_sigma.png", "summary.md",
                                   "summary.csv"])
  assert "| n/a |" in (out / "summary.md").read_text()   # no resamples, no intervals
  markdown = (out / "summary.md").read_text()
  assert "No within-bin comparison" in markdown and "No Wu's check" in markdown


def test_runs(tmp_path, capsys):
  analysis_fixtures.write_run(str(tmp_path / "a" / "sgd"), "sgd", "mnist1d", 0.8)
  analysis_fixtures.write_run(str(tmp_path / "a" / "sam"), "sam", "mnist1d", 0.85)
  analysis_fixtures.write_run(str(tmp_path / "b" / "csam"), "csam", "digits", 0.9,
                              measures=False, status=None)
  (tmp_path / "a" / "sgd" / "checkpoints").mkdir()   # not searched
  (tmp_path / "a" / "sgd" / "checkpoints" / "metrics.jsonl").write_text("{}\n")
  out = tmp_path / "out"
  printed = _run(capsys, f"--logdir={tmp_path}", f"--out={out}")
  _check_files(printed, str(out), ["curves.png", "measures.png", "comparison.png",
                                   "summary.md", "summary.csv"])
  with open(out / "summary.csv") as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"a/sgd", "a/sam", "b/csam"}
  assert rows["b/csam"]["status"] == "unfinished" and rows["b/csam"]["dataset"] == "digits"
  assert float(rows["a/sam"]["test_accuracy"]) == pytest.approx(0.85)
  assert "| mnist1d | sam | 1 | 0.85 |" in (out / "summary.md").read_text()


def test_one_run_without_measures(tmp_path, capsys):
  analysis_fixtures.write_run(str(tmp_path), "sgd", "mnist1d", 0.8, measures=False)
  printed = _run(capsys, f"--logdir={tmp_path}")
  _check_files(printed, str(tmp_path), ["curves.png", "comparison.png", "summary.md",
                                        "summary.csv"])
  assert "No run logged a measure" in (tmp_path / "summary.md").read_text()


def _refused(capsys, *args) -> str:
  with pytest.raises(SystemExit) as info:
    plot.command(["nonuniform_jax.plot", *args])
  assert info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
  assert "missing --logdir" in _refused(capsys)
  assert "does not exist" in _refused(capsys, f"--logdir={tmp_path / 'nowhere'}")
  assert "holds no sweep" in _refused(capsys, f"--logdir={tmp_path}")
  assert "unknown" in _refused(capsys, f"--logdir={tmp_path}", "--colour=red").lower()
  assert "--num_resamples must be >= 0" in _refused(capsys, f"--logdir={tmp_path}",
                                                     "--num_resamples=-1")
  sweep = tmp_path / "sweep"
  analysis_fixtures.write_sweep(str(sweep), criterion={"train_accuracy": 1.5})
  message = _refused(capsys, f"--logdir={sweep}")
  assert "no member of the sweep" in message
  assert "(19 missed the training criterion, 1 diverged, 1 unfinished)" in message
  analysis_fixtures.write_sweep(str(sweep))
  assert "no measure 'hessian_trace/trace'" in _refused(capsys, f"--logdir={sweep}",
                                                        "--sharpness=hessian_trace/trace")
  assert "no measure 'hessian_trace/trace'" in _refused(capsys, f"--logdir={sweep}",
                                                        "--measures=hessian_trace/trace")
  assert sorted(os.listdir(tmp_path)) == ["sweep"]
  assert sorted(os.listdir(sweep)) == ["members", "sweep.json"]


def test_help_as_a_program():
  result = subprocess.run([sys.executable, "-m", "nonuniform_jax.plot", "--help"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Figures and summary tables")
  assert "usage: python -m nonuniform_jax.plot --logdir DIR" in result.stdout
  assert "--out" in result.stdout and "--num_resamples" in result.stdout
