"""The prepared accelerator check starts with only JAX, Flax and Optax (what the accelerator
machine holds; it has no network), and writes its file even when its time budget allows no row.
The rows themselves are rehearsed on a CPU by ``python -m benchmarks.gpu_check --smoke``."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_imports_nothing_the_accelerator_machine_lacks():
  code = ("import sys, benchmarks.gpu_check; "
          "bad = {'ml_collections', 'tensorflow', 'clu', 'tensorflow_datasets', 'mnist1d'} "
          "& {m.split('.')[0] for m in sys.modules}; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def test_writes_the_file_with_the_rows_it_skipped(tmp_path):
  from benchmarks import gpu_check  # pylint: disable=g-import-not-at-top
  out = tmp_path / "BENCHMARKS-GPU.md"
  assert gpu_check.main(["--smoke", "--budget", "0", "--out", str(out)]) == 0
  text = out.read_text()
  assert text.startswith("# Accelerator check") and "Smoke run" in text
  assert text.count("not measured: the time budget was spent") == 2 * (2 * 4 + 1)
