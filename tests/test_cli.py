"""The command lines as a user meets them: help, first contact, one-line refusals, exit
statuses, the measure command on a finished run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from nonuniform_jax import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
TINY = ["--config.num_steps=20", "--config.log_every=10", "--config.eval_every=10",
        "--config.checkpoint_every=10", "--config.train_eval_examples=256",
        "--config.model.widths=(32,)"]


def command(module, *args, cwd=ROOT, timeout=240):
  return subprocess.run([sys.executable, "-m", f"nonuniform_jax.{module}", *args], cwd=cwd,
                        env=ENV, capture_output=True, text=True, timeout=timeout)


def one_line_error(result, status=2) -> str:
  assert result.returncode == status, (result.returncode, result.stderr[-3000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("module", ["main", "measure"])
def test_help_exits_0(module):
  result = command(module, "--help")
  assert result.returncode == 0, result.stderr
  if module == "main":
    for name in sorted(p.name for p in (ROOT / "configs").glob("*.py")):
      assert f"configs/{name}" in result.stdout
    assert "The offline default: an MLP on MNIST-1D" in result.stdout
    assert "--config.optimizer.learning_rate=0.1" in result.stdout
    assert "130 interrupted" in result.stdout
  else:
    assert "--measures" in result.stdout and "--workdir" in result.stdout


def test_a_normal_run_says_what_runs_and_prints_no_banners(tmp_path):
  """First contact: one start-up line (data, model and size, optimizer, length, devices,
  workdir), the final line, and nothing from the frameworks on stderr."""
  result = command("main", "--config=configs/default.py", f"--workdir={tmp_path}", *TINY,
                   "--config.progress=False")
  assert result.returncode == 0, result.stderr
  assert result.stderr == "", result.stderr
  start, final = result.stdout.strip().splitlines()
  assert start == ("mnist1d (4,000 training examples) -> mlp (1,642 parameters), sgd (lr 0.1 "
                   "cosine, momentum 0.9), 20 steps of batch 128 on 1 cpu device; starting in "
                   f"{tmp_path}")
  assert final.startswith("test accuracy ")


@pytest.mark.parametrize("args, message", [
    (["--config.optimzer.name=sam"], "error: unknown setting --config.optimzer.name: the config "
     "has no such key (did you mean --config.optimizer.name?)"),
    (["--config.unknown=1"], "error: unknown setting --config.unknown: the config has no such "
     "key;"),
    # with other overrides beside it (ml_collections then quotes the key twice over)
    (["--config.num_steps=20", "--config.kfac.stats_evry=5", "--config.log_every=5"],
     "error: unknown setting --config.kfac.stats_evry: the config has no such key (did you mean "
     "--config.kfac.stats_every?)"),
    # K-FAC settings are checked, and named, whatever the optimizer
    (["--config.kfac.stats_every=0"], "error: kfac.stats_every must be an integer >= 1, got 0"),
    (["--config.kfac.inverse=cholesky"], "error: kfac.inverse must be one of ('exact', "
     "'factored'), got 'cholesky'"),
    (["--config.optimizer.name=csam", "--config.csam.metric=kfac", "--config.kfac.ema_decay=1.0"],
     "error: kfac.ema_decay must be a number in [0, 1), got 1.0"),
    (["--config.num_epochs=nan"], "error: num_epochs must be a finite number, got nan"),
    (["--config.schedule.step_factor=nan"], "error: schedule.step_factor must be a finite number"),
    (["--config.model.widths=(0,)"], "error: model 'mlp': widths=(0,) must hold sizes >= 1"),
    (["--config.num_steps=0", "--config.num_epochs=inf"], "error: num_epochs must be a finite"),
    (["--config.batch_size=5000"], "error: batch_size=5000 exceeds the 4000 training examples"),
])
def test_bad_settings_are_one_line_and_write_nothing(args, message, tmp_path):
  workdir = tmp_path / "w"
  result = command("main", "--config=configs/default.py", f"--workdir={workdir}", *args)
  assert one_line_error(result).startswith(message)
  assert not workdir.exists()


def test_broken_config_files_and_bad_workdirs_are_one_line(tmp_path):
  raising = tmp_path / "raising.py"
  raising.write_text("def get_config():\n  raise RuntimeError('boom')\n")
  importing = tmp_path / "importing.py"
  importing.write_text("import no_such_module\n")
  a_file = tmp_path / "a_file"
  a_file.write_text("precious")
  cases = [
      ([f"--config={raising}", f"--workdir={tmp_path / 'w'}"],
       f"error: cannot load config file '{raising}': RuntimeError: boom"),
      ([f"--config={raising}", f"--workdir={tmp_path / 'w'}", "--config.seed=1"],
       f"error: cannot load config file '{raising}': RuntimeError: boom"),
      ([f"--config={importing}", f"--workdir={tmp_path / 'w'}"],
       f"error: cannot load config file '{importing}': ModuleNotFoundError: No module named "
       "'no_such_module'"),
      (["--config=configs/default.py", f"--workdir={a_file}"],
       f"error: workdir '{a_file}' is a file, not a directory"),
      (["--config=configs/default.py", f"--workdir={a_file}/run"],
       f"error: workdir '{a_file}/run' cannot be created: '{a_file}' is a file"),
      (["--config=configs/default.py"], "error: missing --workdir;"),
  ]
  for args, message in cases:
    assert one_line_error(command("main", *args)).startswith(message), args
  assert a_file.read_text() == "precious" and not (tmp_path / "w").exists()


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
  from nonuniform_jax import train  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path)
                      else real_access(p, mode))
  with pytest.raises(ValueError, match=r"workdir '.*/run' is not writable \(its parent '.*' is "
                                       r"not writable\)"):
    train.train_and_evaluate(default.get_config(), str(tmp_path / "run"))
  assert os.listdir(tmp_path) == []


def test_divergence_exits_3_and_measure_runs_on_a_finished_run(tmp_path):
  """A diverged run exits 3 in one line saying which checkpoint is good; the README's measure
  command runs on a finished run (it used to crash on a duplicate flag)."""
  diverged = command("main", "--config=configs/default.py", f"--workdir={tmp_path / 'd'}",
                     *TINY, "--config.schedule.name=step", "--config.schedule.step_factor=1e32",
                     "--config.schedule.step_boundaries=(0.5,)")
  assert diverged.returncode == 3, diverged.stderr
  last = diverged.stdout.strip().splitlines()[-1]
  assert last.startswith("diverged at step ") and last.endswith(
      "(non-finite training loss); the last good checkpoint, step 10, is kept")
  summary = json.loads((tmp_path / "d" / wd.SUMMARY_FILE).read_text())
  assert summary["status"] == "diverged" and summary["last_good_checkpoint"] == 10
  again = command("main", "--config=configs/default.py", f"--workdir={tmp_path / 'd'}", *TINY,
                  "--config.schedule.name=step", "--config.schedule.step_factor=1e32",
                  "--config.schedule.step_boundaries=(0.5,)")
  assert again.returncode == 3 and again.stdout.strip() == last   # reported, not rerun

  result = command("measure", f"--workdir={tmp_path / 'd'}", "--measures=hessian_trace",
                   "--set=hessian_trace.num_probes=4", "--num_examples=64")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("measure/hessian_trace/trace = ")
  record = json.loads((tmp_path / "d" / wd.MEASURES_FILE).read_text().splitlines()[-1])
  assert record["step"] == 10 and record["hessian_trace"]["num_probes"] == 4
  bad = command("measure", f"--workdir={tmp_path / 'd'}", "--measures=hessian_trace",
                "--set=hessian_trace.num_probes=many")
  assert "is not a JSON value" in one_line_error(bad)


def test_orbax_noise_about_a_checkpoint_being_written_is_dropped(caplog):
  """Orbax warns that the metadata of a checkpoint still in its temporary folder does not exist
  (another thread looked while it was written); other warnings, and the same one about a real
  checkpoint, still show."""
  import logging  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_logs()
  absl_logger = logging.getLogger("absl")
  with caplog.at_level(logging.WARNING, logger="absl"):
    absl_logger.warning("Metadata file does not exist: %s",
                        "/w/checkpoints/1500.orbax-checkpoint-tmp/_CHECKPOINT_METADATA")
    absl_logger.warning("Metadata file does not exist: %s", "/w/checkpoints/1500/_METADATA")
    absl_logger.warning("something else")
  messages = [r.getMessage() for r in caplog.records]
  assert messages == ["Metadata file does not exist: /w/checkpoints/1500/_METADATA",
                      "something else"], messages
