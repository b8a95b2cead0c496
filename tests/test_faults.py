"""Faults: a run killed (SIGKILL, SIGINT, SIGTERM) at many points, corrupted checkpoints, two
runs at once, lost files, a full disk. Each ends, after the same command is run again, with the
metrics.jsonl and parameters of an uninterrupted run, or is refused in one line with nothing
lost. Processes that must really die run ``tests/fault_runner.py``; the reruns run in this
process (they compile from the session's cache)."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import default
from nonuniform_jax import checkpoints, train, workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# 60 steps, checkpoints at 20, 40, 60; metrics every 10 steps, evaluation every 20.
OVERRIDES = {"num_steps": 60, "log_every": 10, "eval_every": 20, "checkpoint_every": 20,
             "train_eval_examples": 256, "progress": False, "model.widths": (32,)}


def small_config(**extra):
  c = default.get_config()
  for key, value in {**OVERRIDES, **extra}.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def cli_args(workdir, **extra) -> list[str]:
  items = {**OVERRIDES, **extra}
  return [f"--config={ROOT}/configs/default.py", f"--workdir={workdir}"] + [
      f"--config.{k}={v if not isinstance(v, tuple) else repr(v)}" for k, v in items.items()]


def run_with_fault(fault: str, workdir, timeout=240, **extra):
  return subprocess.run([sys.executable, str(ROOT / "tests" / "fault_runner.py"), fault, "--",
                         *cli_args(workdir, **extra)], env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def params(workdir):
  return checkpoints.read_state(str(workdir))["params"]


def assert_same_run(workdir, reference):
  assert (pathlib.Path(workdir) / "metrics.jsonl").read_text() == \
      (pathlib.Path(reference) / "metrics.jsonl").read_text()
  jax.tree.map(np.testing.assert_array_equal, params(workdir), params(reference))
  summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
  assert summary["status"] == "completed"
  assert summary["final"] == json.loads(
      (pathlib.Path(reference) / "summary.json").read_text())["final"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  train.train_and_evaluate(small_config(), str(workdir))
  return workdir


# ----------------------------------------------------------------------- real process deaths

KILL_POINTS = ["kill_at_step:{}", "kill_in_save:20", "kill_in_save:60", "kill_at_summary"]


@pytest.mark.parametrize("fault", KILL_POINTS)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(fault, reference, tmp_path):
  """SIGKILL at a random step, in the middle of writing a checkpoint (the first, and the last),
  and after the last checkpoint before the summary: the same command then ends with the
  uninterrupted run's metrics.jsonl, parameters and final numbers."""
  fault = fault.format(random.Random(fault).randrange(21, 60))   # after the first checkpoint
  result = run_with_fault(fault, tmp_path)
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert not (tmp_path / "summary.json").exists()
  train.train_and_evaluate(small_config(), str(tmp_path))
  assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_stop_in_one_line_with_status_130(sig, reference, tmp_path):
  process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_runner.py"),
                              "hold_at_step:30", "--", *cli_args(tmp_path)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert process.stdout.readline().startswith("mnist1d")   # the start-up line
  assert process.stdout.readline().strip() == "holding"
  process.send_signal(sig)
  out, err = process.communicate(timeout=60)
  assert process.returncode == 130, err[-3000:]
  assert err.strip() == ("error: interrupted at step 30 (last checkpoint: step 20); run the "
                         "same command to resume"), err[-3000:]
  train.train_and_evaluate(small_config(), str(tmp_path))
  assert_same_run(tmp_path, reference)


def test_a_second_run_is_refused_at_once_naming_the_holder(reference, tmp_path):
  """While one run holds the workdir, a second is refused in one line naming it, before loading
  anything or writing; once the holder is killed (-9: no clean-up), the lock is free."""
  process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fault_runner.py"),
                              "hold_at_step:30", "--", *cli_args(tmp_path)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    while process.stdout.readline().strip() != "holding":
      assert process.poll() is None
    before = sorted(os.listdir(tmp_path))
    start = time.time()
    with pytest.raises(wd.WorkdirBusy) as info:
      train.train_and_evaluate(small_config(), str(tmp_path))
    assert time.time() - start < 5
    message = str(info.value)
    assert f"is in use by another run (pid {process.pid} on " in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == before
  finally:
    process.kill()
    process.wait()
  train.train_and_evaluate(small_config(), str(tmp_path))
  assert_same_run(tmp_path, reference)


def test_a_full_disk_is_one_line_and_the_rerun_resumes(reference, tmp_path):
  result = run_with_fault("disk_full_in_save:40", tmp_path)
  assert result.returncode == 75, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: no space left on the device of workdir {str(tmp_path)!r} ("), result.stderr
  assert "free); what was saved is intact" in lines[0]
  train.train_and_evaluate(small_config(), str(tmp_path))
  assert_same_run(tmp_path, reference)


# --------------------------------------------------------------------- corrupted checkpoints


def _largest_array_file(step_dir: pathlib.Path) -> pathlib.Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  return max(files, key=lambda p: p.stat().st_size)


def _swap_arrays(step_dir: pathlib.Path, other: pathlib.Path) -> None:
  """Checkpoint ``step_dir`` gets the (readable) arrays of ``other`` and keeps its own meta, as
  a copy that changed bytes would: only the checksums can tell."""
  shutil.rmtree(step_dir / "state")
  shutil.copytree(other / "state", step_dir / "state")


CORRUPTIONS = {
    "truncated data file": lambda d: os.truncate(_largest_array_file(d), 16),
    "garbage _METADATA": lambda d: (d / "state" / "_METADATA").write_bytes(b"\x00\xffgarbage"),
    "zero-length _METADATA": lambda d: (d / "state" / "_METADATA").write_bytes(b""),
    "empty step folder": lambda d: (shutil.rmtree(d), d.mkdir()),
    "random bytes over a data file": lambda d: _largest_array_file(d).write_bytes(
        np.random.default_rng(0).bytes(8192)),
    "arrays changed after saving": lambda d: _swap_arrays(d, d.parent / "40"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(name, reference, tmp_path,
                                                                  capsys):
  """The finished reference run without its summary, its newest checkpoint (60) corrupted: the
  rerun says so in one line, moves it aside (nothing is deleted), resumes from 40 and ends
  equal to the uninterrupted run."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  (workdir / "summary.json").unlink()
  CORRUPTIONS[name](workdir / "checkpoints" / "60")
  train.train_and_evaluate(small_config(), str(workdir))
  err = capsys.readouterr().err.strip().splitlines()
  warning = [line for line in err if line.startswith("warning: checkpoint")]
  assert len(warning) == 1, err
  assert warning[0].startswith(f"warning: checkpoint {workdir}/checkpoints/60 is ")
  assert warning[0].endswith(f"moved to {workdir}/checkpoints_corrupt/60; falling back to the "
                             "one before")
  if name == "arrays changed after saving":
    assert "checksum mismatch" in warning[0]
  assert (workdir / "checkpoints_corrupt" / "60").is_dir()
  assert_same_run(workdir, reference)


# ----------------------------------------------------------------------------- lost files


@pytest.mark.parametrize("lost", [("metrics.jsonl",), ("config.json",),
                                  ("metrics.jsonl", "config.json", "timing.jsonl")])
def test_lost_files_come_back_from_the_checkpoint(lost, reference, tmp_path):
  """An interrupted run (its last checkpoint 40) whose logs or config were deleted while it was
  stopped resumes with them restored from the checkpoint, byte for byte."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  for path in [workdir / "summary.json", workdir / "checkpoints" / "60"]:
    shutil.rmtree(path) if path.is_dir() else path.unlink()
  for name in lost:
    (workdir / name).unlink()
  train.train_and_evaluate(small_config(), str(workdir))
  assert_same_run(workdir, reference)
  assert json.loads((workdir / "config.json").read_text()) == json.loads(
      (reference / "config.json").read_text())


def test_lost_config_and_a_different_config_is_refused(reference, tmp_path):
  """Without config.json the checkpoints still say whose run it is: another config is refused
  (before anything is written), the same one resumes."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  for name in ("config.json", "summary.json"):
    (workdir / name).unlink()
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  with pytest.raises(ValueError, match=r"holds a run of a different config \(optimizer."
                                       r"learning_rate: 0.1 -> 0.05\)"):
    train.train_and_evaluate(small_config(**{"optimizer.learning_rate": 0.05}), str(workdir))
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_a_finished_run_without_its_summary_is_finished_from_its_checkpoint(reference, tmp_path,
                                                                            monkeypatch):
  """Deleting summary.json of a finished run (or dying just before writing it) used to break
  the run for good: the rerun now writes the summary from the final checkpoint, training
  nothing."""
  workdir = tmp_path / "w"
  shutil.copytree(reference, workdir)
  (workdir / "summary.json").unlink()
  monkeypatch.setattr(train.steps, "make_train_step",
                      lambda *a, **k: lambda *a2, **k2: pytest.fail("trained a step"))
  summary = train.train_and_evaluate(small_config(), str(workdir))
  assert summary["status"] == "completed"
  assert_same_run(workdir, reference)


def test_checkpoints_from_before_they_carried_meta_still_resume(reference, tmp_path):
  """A workdir written by an earlier version (checkpoints of the state alone, logs in the
  files): the run resumes from its checkpoint and the files' own records, and ends equal to an
  uninterrupted run."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "w"
  workdir.mkdir()
  for name in ("config.json", "metrics.jsonl", "timing.jsonl"):
    shutil.copy(reference / name, workdir / name)
  state = checkpoints.read_state(str(reference), 40)
  with ocp.CheckpointManager(workdir / "checkpoints") as manager:
    manager.save(40, args=ocp.args.StandardSave(state))
  assert (workdir / "checkpoints" / "40" / "default").is_dir()
  train.train_and_evaluate(small_config(), str(workdir))
  assert_same_run(workdir, reference)


def test_a_signal_inside_a_checkpoint_save_waits_for_the_save(tmp_path, monkeypatch):
  """A SIGTERM that arrives while Orbax's save call runs is held until the call returns, then
  raised by the handler in force (the commands': KeyboardInterrupt). Raised inside the call, it
  left background writes that the interrupted run's wait did not know of, which failed at
  interpreter shutdown and kept a sweep's workers alive 40 s (measured before the fix)."""
  def interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")
  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    ckpts = checkpoints.Checkpoints(str(tmp_path), keep=2)
    manager = type(ckpts.manager)
    save = manager.save
    inside = []

    def save_with_a_signal(self, *args, **kwargs):
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)   # a handler that runs now interrupts the save halfway
      inside.append(True)
      return save(self, *args, **kwargs)

    monkeypatch.setattr(manager, "save", save_with_a_signal)
    state = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}
    with pytest.raises(KeyboardInterrupt):
      ckpts.save(7, state, {"note": "held"})
    assert inside == [True]
    assert signal.getsignal(signal.SIGTERM) is interrupt
    ckpts.wait()
    restored = ckpts.restore(7, state)
    np.testing.assert_array_equal(restored.state["w"], state["w"])
    assert restored.meta["note"] == "held"
    ckpts.close()
  finally:
    signal.signal(signal.SIGTERM, previous)
