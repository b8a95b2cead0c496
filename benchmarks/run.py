"""Runs every ``benchmarks/bench_*.py``, prints one table and rewrites BENCHMARKS.md.

    python -m benchmarks.run            # full measurement (a few minutes on a 2-core CPU)
    python -m benchmarks.run --quick    # smaller sizes, to check that everything runs
    python -m benchmarks.run --only sam,data   # splices these rows into BENCHMARKS.md
    python -m benchmarks.run --only csam --cases "default MLP"   # some of a benchmark's cases

Each module exposes ``run(quick: bool) -> list[dict]`` with rows of: benchmark, case, value,
unit, goal, ok, note. Every value is a ratio measured side by side in this one process, so
results from different machines compare; absolute times go only in notes.
"""

import argparse
import datetime
import importlib
import inspect
import os
import pathlib
import platform
import sys
import traceback

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
COLUMNS = ("benchmark", "case", "value", "unit", "goal", "ok", "note")


def _modules(only):
  names = sorted(p.stem for p in HERE.glob("bench_*.py"))
  if only:
    names = [n for n in names if n.removeprefix("bench_") in only]
  return names


def _cell(row, key):
  value = row.get(key, "")
  if key == "value" and isinstance(value, float):
    return f"{value:.3g}"
  if key == "ok":
    return {True: "yes", False: "**no**", None: "–"}.get(value, str(value))
  return str(value)


def _table(rows) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cell(r, k) for k in COLUMNS) + " |" for r in rows]
  return "\n".join(lines)


def splice(document: str, rows, cases: tuple = ()) -> str:
  """``document`` (BENCHMARKS.md) with the table rows of the benchmarks named in ``rows``
  replaced by ``rows``, where the first of them stood (appended to the table when none did);
  every other line, the prose around the table included, is kept as it is. ``cases``: only the
  rows whose case starts with one of these are replaced (a run of some of the cases)."""
  names = {r["benchmark"] for r in rows}
  lines = document.split("\n")
  table = [i for i, line in enumerate(lines) if line.startswith("| ")][1:]   # below the header
  old = [i for i in table if lines[i].split(" | ")[0][2:] in names and (
      not cases or lines[i].split(" | ")[1].startswith(tuple(cases)))]
  at = old[0] if old else table[-1] + 1
  new = _table(rows).split("\n")[2:]
  kept = [line for i, line in enumerate(lines) if i not in set(old)]
  at -= sum(1 for i in old if i < at)
  return "\n".join(kept[:at] + new + kept[at:])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", default="", help="comma-separated topics, e.g. sam,data")
  parser.add_argument("--cases", default="", help="comma-separated cases of the benchmarks that "
                      "take them (bench_csam: 'default MLP', 'paper MLP 784-128-64-10', "
                      "'ResNet-20'); needs --only")
  parser.add_argument("--no-write", action="store_true", help="print only")
  args = parser.parse_args(argv)
  cases = tuple(filter(None, (c.strip() for c in args.cases.split(","))))
  if cases and not args.only:
    parser.error("--cases needs --only")
  sys.path.insert(0, str(ROOT))
  import jax  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import parallel  # pylint: disable=g-import-not-at-top
  parallel.single_blas_thread()   # as the commands run (cli.as_program)

  rows = []
  for name in _modules(set(filter(None, args.only.split(",")))):
    try:
      module = importlib.import_module(f"benchmarks.{name}")
      if cases and "cases" not in inspect.signature(module.run).parameters:
        parser.error(f"--cases: {name} runs all of its cases")
      unknown = [c for c in cases if c not in getattr(module, "CASES", cases)]
      if unknown:
        parser.error(f"--cases: {name} has no case {unknown[0]!r}; its cases are "
                     f"{', '.join(module.CASES)}")
      rows += module.run(quick=args.quick, **({"cases": cases} if cases else {}))
    except Exception as e:  # a broken benchmark is reported, not hidden
      traceback.print_exc()
      rows.append({"benchmark": name, "case": "error", "value": float("nan"), "unit": "",
                   "goal": "", "ok": False, "note": f"{type(e).__name__}: {e}"})
  table = _table(rows)
  print(table)
  if not args.no_write and args.only and (ROOT / "BENCHMARKS.md").exists():
    path = ROOT / "BENCHMARKS.md"
    path.write_text(splice(path.read_text(), rows, cases))
  elif not args.no_write:
    device = jax.devices()[0]
    header = (
        "# Benchmarks\n\n"
        "Written by `python -m benchmarks.run" + (" --quick" if args.quick else "") + "` on "
        f"{datetime.date.today().isoformat()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, JAX {jax.__version__} on {device.platform} "
        f"({device.device_kind}). Values are ratios measured side by side in one process; "
        "notes give absolute times on this machine.\n\n")
    (ROOT / "BENCHMARKS.md").write_text(header + table + "\n")
  return 0 if all(r.get("ok") is not False for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
