"""End to end: the default experiment, resume after a crash, determinism, divergence, workdir
protection, and every bad-input case of the command line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from nonuniform_jax import checkpoints, data, plan, train, workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(**overrides):
  c = default.get_config()
  c.num_steps = 40
  c.log_every = 10
  c.eval_every = 20
  c.checkpoint_every = 20
  c.train_eval_examples = 512
  c.progress = False
  c.model.widths = (32,)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def read_lines(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def final_params(workdir):
  return checkpoints.read_state(workdir)["params"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  summary = train.train_and_evaluate(small_config(), workdir)
  return workdir, summary


def test_default_run_writes_everything(reference_run):
  workdir, summary = reference_run
  assert summary["status"] == "completed"
  for key in ("test_accuracy", "eval_train_accuracy", "generalization_gap", "accuracy_gap"):
    assert np.isfinite(summary["final"][key])
  assert summary["final"]["test_accuracy"] > 0.15   # better than chance (0.1) after 40 steps
  np.testing.assert_allclose(summary["final"]["generalization_gap"],
                             summary["final"]["test_loss"] - summary["final"]["eval_train_loss"])
  assert summary["settings"]["global_batch"] == 128
  assert summary["devices"]["num_devices"] == jax.device_count()
  assert summary["versions"]["jax"] == jax.__version__
  lines = read_lines(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in lines] == [10, 20, 30, 40]
  assert "test_loss" in lines[1] and "test_loss" not in lines[0]
  assert {"train_loss", "train_accuracy", "learning_rate"} <= set(lines[0])
  timing = read_lines(os.path.join(workdir, "timing.jsonl"))
  assert all(t["examples_per_second"] > 0 for t in timing)
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
  with open(os.path.join(workdir, "dataset.json")) as f:   # written at the start
    assert json.load(f) == json.loads(json.dumps(summary["dataset"], default=str))


def test_rerunning_a_completed_run_only_reports(reference_run, monkeypatch):
  workdir, summary = reference_run
  monkeypatch.setattr(data, "get_datasets", lambda *a, **k: pytest.fail("retrained"))
  assert train.train_and_evaluate(small_config(), workdir)["final"] == summary["final"]


def test_same_config_same_metrics(reference_run, tmp_path):
  workdir, _ = reference_run
  train.train_and_evaluate(small_config(), str(tmp_path))
  assert (tmp_path / "metrics.jsonl").read_text() == \
      pathlib.Path(workdir, "metrics.jsonl").read_text()


def test_resume_after_crash_matches_uninterrupted(reference_run, tmp_path, monkeypatch):
  workdir, _ = reference_run
  real_prefetch = data.prefetch_to_device

  def crashing_prefetch(iterator, size, sharding):
    for i, batch in enumerate(real_prefetch(iterator, size, sharding)):
      if i == 25 and "mask" not in batch:   # training batch 26: after the step-20 checkpoint
        raise KeyboardInterrupt("simulated crash")
      yield batch

  monkeypatch.setattr(data, "prefetch_to_device", crashing_prefetch)
  with pytest.raises(train.Interrupted, match=r"interrupted at step 25 \(last checkpoint: "
                                              r"step 20\); run the same command to resume"):
    train.train_and_evaluate(small_config(), str(tmp_path))
  assert not (tmp_path / "summary.json").exists()
  # A torn last line, as a kill -9 in the middle of a write leaves it.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 30, "train_lo')
  monkeypatch.setattr(data, "prefetch_to_device", real_prefetch)
  summary = train.train_and_evaluate(small_config(), str(tmp_path))
  assert summary["status"] == "completed"
  assert (tmp_path / "metrics.jsonl").read_text() == \
      pathlib.Path(workdir, "metrics.jsonl").read_text()
  jax.tree.map(np.testing.assert_array_equal, final_params(str(tmp_path)),
               final_params(workdir))


def test_divergence_is_reported_and_last_good_checkpoint_kept(tmp_path):
  # Trains normally for 30 steps (checkpoints at 10, 20, 30), then the rate jumps to 5e30.
  config = small_config(**{"optimizer.learning_rate": 0.05, "schedule.name": "step",
                           "schedule.step_boundaries": (0.5,), "schedule.step_factor": 1e32,
                           "num_steps": 60, "checkpoint_every": 10})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["status"] == "diverged"
  step = summary["diverged_step"]
  assert 30 < step <= 60
  saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
  assert saved and saved[-1] == 30 and saved[-1] < step   # the last good one is kept
  assert json.loads((tmp_path / "summary.json").read_text())["diverged_step"] == step


def test_different_config_refused_unless_overwrite(reference_run, tmp_path):
  train.train_and_evaluate(small_config(num_steps=10, checkpoint_every=10), str(tmp_path))
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(ValueError, match=r"different config \(num_steps: 10 -> 20\)"):
    train.train_and_evaluate(small_config(num_steps=20, checkpoint_every=10), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == before
  summary = train.train_and_evaluate(
      small_config(num_steps=20, checkpoint_every=10, overwrite=True), str(tmp_path))
  assert summary["settings"]["num_steps"] == 20


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": "mnist2d"}, "unknown dataset 'mnist2d'"),
    ({"model.name": "resnet7"}, "unknown model 'resnet7'; choose one of"),
    ({"optimizer.name": "lamb"}, "unknown optimizer 'lamb'; choose one of"),
    ({"schedule.name": "poly"}, "unknown schedule 'poly'; choose one of"),
    ({"optimizer.learning_rate": 0.0},
     "optimizer.learning_rate must be a finite number > 0, got 0.0"),
    ({"batch_size": -8}, "batch_size"),
    ({"num_steps": 0}, "num_steps (0) or num_epochs (0.0) must be > 0"),
    ({"task": "pretrain"}, "unknown task 'pretrain'; choose one of"),
    ({"optimizer.name": "sam", "sam.rho": -0.1}, "sam.rho must be a finite number >= 0, got -0.1"),
    ({"optimizer.name": "sam", "sam.m": 48}, "sam.m 48 must divide the per-device batch 128"),
    ({"optimizer.name": "sam", "sam.bn_policy": "never"}, "unknown sam.bn_policy 'never'"),
    ({"optimizer.name": "csam", "csam.alpha": 1.5},
     "optimizer 'csam', settings csam.rho1, csam.rho2, csam.alpha, csam.metric, "
     "csam.momentum_sign, sam.eta, kfac.*: alpha must be in [0, 1), got 1.5"),
    ({"optimizer.name": "csam", "csam.metric": "kfac", "kfac.damping": 0.0},
     "damping must be > 0, got 0.0"),
    ({"optimizer.name": "gam", "kfac.stats_every": 0}, "stats_every must be an integer >= 1"),
    ({"optimizer.name": "sam_gcm", "sam_gcm.xi": -1.0},
     "optimizer 'sam_gcm', settings sam_gcm.rho, sam_gcm.xi, sam_gcm.max_params: xi must be a "
     "finite number > 0, got -1.0"),
    ({"data_seed": -2}, "data_seed -2 must be an integer >= 0, or -1 (the run's seed)"),
    ({"optimizer.learning_rate": float("inf")}, "optimizer.learning_rate must be a finite number"),
    ({"optimizer.name": "sam", "sam.rho": float("inf")}, "sam.rho must be a finite number, got inf"),
    ({"optimizer.momentum": -5.0}, "optimizer.momentum must be in [0.0, 1.0), got -5.0"),
    ({"optimizer.grad_clip_norm": -1.0}, "optimizer.grad_clip_norm must be a finite number >= 0"),
    ({"schedule.warmup_steps": -10}, "schedule.warmup_steps must be an integer >= 0, got -10"),
    ({"model.widths": (0,)}, "model 'mlp': widths=(0,) must hold sizes >= 1"),
    ({"model.widths": (-5,)}, "model 'mlp': widths=(-5,) must hold sizes >= 1"),
    ({"num_steps": 0, "num_epochs": float("inf")}, "num_epochs must be a finite number, got inf"),
    ({"num_epochs": float("nan")}, "num_epochs must be a finite number, got nan"),
    ({"schedule.step_factor": float("nan")}, "schedule.step_factor must be a finite number"),
    ({"model.name": "resnet20", "model.depth": 21, "dataset": "digits"},
     "CIFAR ResNet depth 21 is not 6n+2"),
    ({"model.name": "vit", "model.patch_size": 3, "dataset": "digits"},
     "model 'vit' with {'patch_size': 3} cannot be built for the inputs of 'digits' (shape (8, 8, 1))"),
])
def test_bad_input_is_one_line_error_before_anything(overrides, message, tmp_path, monkeypatch):
  monkeypatch.setattr(data, "get_datasets", lambda *a, **k: pytest.fail("data was loaded"))
  config = small_config()
  if overrides.get("model.name"):
    config.model = ml_collections.ConfigDict({"name": overrides.pop("model.name")})
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert message in str(info.value) and "\n" not in str(info.value)
  assert not (tmp_path / "w").exists()


def _cli(*args, cwd):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "nonuniform_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_missing_dataset_is_one_line(tmp_path):
  """A dataset that is not prepared: exit status 2 and, as the last line, which dataset, where
  it looked and how to prepare it; the workdir is left as it was."""
  workdir, empty = tmp_path / "w", tmp_path / "tfds"
  workdir.mkdir()
  empty.mkdir()
  (workdir / "keep.txt").write_text("precious")
  result = _cli(f"--config={ROOT}/configs/cifar10_resnet20.py:laptop", f"--workdir={workdir}",
                f"--config.data_dir={empty}", cwd=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: dataset 'cifar10' is not prepared"), result.stderr[-2000:]
  assert str(empty) in last and "tfds build cifar10" in last
  assert "Traceback" not in result.stderr
  assert sorted(os.listdir(workdir)) == ["keep.txt"]


def test_cli_bad_override_and_missing_config(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("precious")
  result = _cli(f"--config={ROOT}/configs/default.py", f"--workdir={workdir}",
                "--config.optimizer.name=lamb", cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith("error: unknown optimizer 'lamb'")
  assert len(result.stderr.strip().splitlines()) == 1
  assert sorted(os.listdir(workdir)) == ["keep.txt"]
  for args, message in [
      (("--config=configs/nope.py",), "error: cannot load config file"),
      (("--config=configs/nope.py", "--config.num_steps=3"), "error: cannot load config file "
                                                              "'configs/nope.py': no such file"),
      ((f"--config={ROOT}/configs/cifar10_resnet20.py:lapto",),
       "unknown config variant ['lapto']; choose from ['laptop']"),
      ((f"--config={ROOT}/configs/default.py", "--config.optimizer.lrr=3"),
       "error: unknown setting --config.optimizer.lrr: the config"),
      ((f"--config={ROOT}/configs/default.py", "--config.num_steps=abc"),
       "error: flag --config.num_steps=abc: invalid literal")]:
    result = _cli(*args, f"--workdir={workdir}", cwd=tmp_path)
    assert result.returncode == 2, (args, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
    assert message in result.stderr, (args, result.stderr)
    assert sorted(os.listdir(workdir)) == ["keep.txt"]


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.name": "sam_gcm"}, "optimizer 'sam_gcm' needs per-example gradients, which "
                                    "BatchNorm (in model 'vgg16_bn') does not have"),
    ({"measure_nonuniformity": True, "measures.bn_mode": "batch",
      "measures.settings.batch_gradient_noise.batch_size": 16},
     "measures ['batch_gradient_noise', 'gradient_noise', 'kfac_structure', "
     "'wu_nonuniformity'] take per-example"),
])
def test_model_dependent_refusals_leave_the_workdir_untouched(overrides, message, tmp_path):
  """What only the model can tell (it has BatchNorm) is refused before the workdir is written
  and before the data are read: CIFAR-10 is not prepared in ``data_dir``, and loading it would
  fail with another message."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "keep.txt").write_text("precious")
  config = small_config(dataset="cifar10", data_dir=str(tmp_path / "no_data"), **overrides)
  config.model = ml_collections.ConfigDict({"name": "vgg16_bn", "stages": ((8,),)})
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(config, str(workdir))
  assert message in str(info.value) and "\n" not in str(info.value)
  assert sorted(os.listdir(workdir)) == ["keep.txt"]


def test_sam_gcm_refuses_a_large_model_before_reading_data(tmp_path):
  """SAM-GCM's size limit is checked from the dataset's shape and the abstract model, before
  the (here unprepared) data are read and before the workdir is written."""
  config = small_config(dataset="cifar10", data_dir=str(tmp_path / "no_data"),
                        **{"optimizer.name": "sam_gcm", "sam_gcm.max_params": 50_000})
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(config, str(tmp_path / "w"))
  # 3072 inputs -> 32 -> 10: 98,666 parameters.
  assert str(info.value) == (
      "optimizer 'sam_gcm' needs the per-example gradient covariance: model 'mlp' on 'cifar10' "
      "has 98666 parameters, more than sam_gcm.max_params=50000; use a smaller model or raise "
      "sam_gcm.max_params")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["cov", "sam_gcm"])
def test_per_example_optimizers_refuse_dropout(name, tmp_path):
  """Per-example gradients (each example a batch of one) would draw dropout masks apart from
  the batch's, so COV's centring and SAM-GCM's covariance would not match the batch gradient."""
  config = small_config(dataset="digits", **{"optimizer.name": name})
  config.model = ml_collections.ConfigDict({"name": "vit_tiny", "patch_size": 4,
                                            "dropout_rate": 0.1})
  with pytest.raises(ValueError, match=r"needs per-example gradients, which dropout "
                                       r"\(model.dropout_rate=0.1\)"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists() or not os.listdir(tmp_path / "w")


def test_kill_9_then_rerun_matches_uninterrupted(tmp_path):
  """The command line killed with SIGKILL after its first checkpoint, then run again, ends with
  the metrics and parameters of an uninterrupted run."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  overrides = ["--config.num_steps=1500", "--config.log_every=50", "--config.eval_every=100",
               "--config.checkpoint_every=100", "--config.train_eval_examples=256"]
  args = [sys.executable, "-m", "nonuniform_jax.main", f"--config={ROOT}/configs/default.py",
          *overrides]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  subprocess.run([*args, f"--workdir={whole}"], env=env, check=True, capture_output=True,
                 timeout=300)
  process = subprocess.Popen([*args, f"--workdir={killed}"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    done = [d for d in os.listdir(killed / "checkpoints")] if (killed / "checkpoints").exists() \
        else []
    if any(d.isdigit() for d in done):
      break
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed: make it longer"
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  assert not (killed / "summary.json").exists()
  subprocess.run([*args, f"--workdir={killed}"], env=env, check=True, capture_output=True,
                 timeout=300)
  assert json.loads((killed / "summary.json").read_text())["status"] == "completed"
  assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
  jax.tree.map(np.testing.assert_array_equal, final_params(str(killed)), final_params(str(whole)))


def test_data_seed_draws_the_data_and_seed_the_weights(tmp_path, monkeypatch):
  """Runs that differ in ``seed`` alone train on the same subset in the same order; runs that
  differ in ``data_seed`` alone start from the same weights on other data. Each run stops when
  the trainer opens its stream of training batches, after three of them are read."""

  class Seen(Exception):
    pass

  def recording_prefetch(iterator, size, sharding):   # the trainer's first call: training
    del size, sharding
    raise Seen(np.concatenate([next(iterator)["labels"] for _ in range(3)]))

  monkeypatch.setattr(data, "prefetch_to_device", recording_prefetch)

  def run(name, **seeds):
    config = small_config(num_train_examples=600, train_eval_examples=64, **seeds)
    p = plan.read(config)
    with pytest.raises(Seen) as seen:
      train.train_and_evaluate(config, str(tmp_path / name))
    return seen.value.args[0], p.data.seed, train.build(p).state.params

  labels, data_seed, init = run("default")                        # data_seed -1: the seed, 0
  labels_s, data_seed_s, init_s = run("other_seed", seed=1, data_seed=0)
  labels_d, data_seed_d, init_d = run("other_data", data_seed=7)
  assert (data_seed, data_seed_s, data_seed_d) == (0, 0, 7)
  assert labels.shape == (3 * 128,)
  np.testing.assert_array_equal(labels_s, labels)
  assert not np.array_equal(labels_d, labels)
  jax.tree.map(np.testing.assert_array_equal, init_d, init)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(init_s),
                                                      jax.tree.leaves(init)))


@pytest.mark.parametrize("inverse_every", [3, 2])
def test_kfac_run_resumed_in_the_middle_of_a_period_matches(inverse_every, tmp_path,
                                                            monkeypatch):
  """CSAM-K-FAC interrupted after its step-4 checkpoint, between refreshes (statistics at
  updates 0, 3, 6), resumes with the schedule the trainer derives from the step: the metrics
  and parameters equal an uninterrupted run's."""
  config = small_config(**{"optimizer.name": "csam", "csam.metric": "kfac", "num_steps": 8,
                           "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
                           "kfac.stats_every": 3, "kfac.inverse_every": inverse_every,
                           "batch_size": 32})
  config.model.widths = (16,)
  whole, resumed = tmp_path / "whole", tmp_path / "resumed"
  train.train_and_evaluate(config, str(whole))
  real_prefetch = data.prefetch_to_device

  def crashing_prefetch(iterator, size, sharding):
    for i, batch in enumerate(real_prefetch(iterator, size, sharding)):
      if i == 5 and "mask" not in batch:   # the sixth training batch: after the step-4 save
        raise KeyboardInterrupt("simulated preemption")
      yield batch

  monkeypatch.setattr(data, "prefetch_to_device", crashing_prefetch)
  with pytest.raises(train.Interrupted):
    train.train_and_evaluate(config, str(resumed))
  assert sorted(os.listdir(resumed / "checkpoints")) == ["4"]
  monkeypatch.setattr(data, "prefetch_to_device", real_prefetch)
  assert train.train_and_evaluate(config, str(resumed))["status"] == "completed"
  a, b = read_lines(whole / "metrics.jsonl"), read_lines(resumed / "metrics.jsonl")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
  for ra, rb in zip(a, b):
    for key in ra:
      np.testing.assert_allclose(ra[key], rb[key], rtol=1e-5, atol=1e-7, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               final_params(str(resumed)), final_params(str(whole)))
