"""What a training run records as it goes, and how a resumed run continues it exactly.

A ``Recorder`` owns the run's logs — ``metrics.jsonl`` (every value a function of the config),
``timing.jsonl`` (machine-dependent), ``measures.jsonl`` — the TensorBoard events, the progress
bar and, at the end, ``summary.json``. Only process 0 writes; the others keep the records too, so
that every process puts the same meta into its checkpoints.

Resuming at step N, the logs are those stored in checkpoint N (``nonuniform_jax.checkpoints``):
records written after it by the interrupted run are dropped and written again when the run gets
there, and logs that were deleted come back, so the files end byte-identical to those of an
uninterrupted run. Checkpoints written before they carried logs keep the files' own records up
to step N.
"""

import json
import os
from typing import Any

import jax

from nonuniform_jax import workdir as wd

LOGS = {"metrics": wd.METRICS_FILE, "timing": wd.TIMING_FILE, "measures": wd.MEASURES_FILE}


def _read_records(path: str, last_step: int) -> list[dict]:
  """The records of a JSON-lines file with ``step <= last_step``, up to a torn last line."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        break
      if record.get("step", 0) <= last_step:
        records.append(record)
  return records


def _lines(records: list[dict]) -> str:
  return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)


class Recorder:
  """The logs, TensorBoard and progress of one run (see the module docstring).

  Args:
    workdir: the run's directory.
    start_step: the step the run starts from (0, or the restored checkpoint's).
    total_steps: the run's length, for the progress bar.
    restored: the restored checkpoint's meta (its ``logs``), or None.
    progress: show a progress bar (process 0 only).
    hparams: the flattened config, written to TensorBoard by a run that starts at step 0.
  """

  def __init__(self, workdir: str, *, start_step: int, total_steps: int,
               restored: dict | None, progress: bool, hparams: dict):
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    import tqdm  # pylint: disable=g-import-not-at-top
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    logs = (restored or {}).get("logs")
    self.logs = {}
    for name, filename in LOGS.items():
      path = os.path.join(workdir, filename)
      self.logs[name] = (list(logs.get(name, [])) if logs is not None
                         else _read_records(path, start_step))
    if self.is_main:
      for name in LOGS:
        self._write(name)
    self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_main)
    if start_step == 0:
      self.writer.write_hparams({k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                 for k, v in hparams.items()})
    self.progress = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                              disable=not (progress and self.is_main), dynamic_ncols=True)

  def _write(self, name: str) -> None:
    records = self.logs[name]
    path = os.path.join(self.workdir, LOGS[name])
    if records or os.path.exists(path) or name != "measures":
      wd.write_text(path, _lines(records))

  def record(self, step: int, metrics: dict, timing: dict, measures: dict | None) -> None:
    """Appends the records of a logged step and writes them (process 0)."""
    self.logs["metrics"].append(metrics)
    self.logs["timing"].append(timing)
    if measures:
      self.logs["measures"].append({"step": step, **measures})
    if self.is_main:
      for name in LOGS if measures else ("metrics", "timing"):
        self._write(name)
      self.writer.write_scalars(step, {**metrics, **timing})
    self.progress.update(step - self.progress.n)
    self.progress.set_postfix(loss=f"{metrics['train_loss']:.4f}")

  def meta(self) -> dict:
    """The logs as a checkpoint stores them."""
    return {"logs": {name: list(records) for name, records in self.logs.items()}}

  def last(self, name: str, key: str | None = None) -> dict:
    """The newest record of log ``name`` (with ``key``, the newest that has it), or {}."""
    for record in reversed(self.logs[name]):
      if key is None or key in record:
        return record
    return {}

  def write_summary(self, summary: dict) -> None:
    if self.is_main:
      wd.write_json(os.path.join(self.workdir, wd.SUMMARY_FILE), summary)

  def close(self) -> None:
    self.progress.close()
    self.writer.flush()


def jsonable(value: Any) -> Any:
  """``value`` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))
