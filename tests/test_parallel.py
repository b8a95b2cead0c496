"""Data-parallel training on 8 simulated CPU devices equals 1 device (same global batch and m),
BatchNorm with synchronised statistics equals 1 device and per-device statistics do not, a
checkpoint written on 8 devices resumes on 1, and mismatched batches fail clearly.

The checks need 8 devices, which XLA only simulates when told before JAX starts, so the test
that runs in the ordinary suite starts this file again in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from tests.test_train import final_params, read_lines, small_config
from nonuniform_jax import data, parallel, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="runs in the 8-device subprocess")


def test_on_8_simulated_devices():
  if jax.device_count() >= 8:
    pytest.skip("this is the subprocess")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": str(ROOT)}
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert " passed" in result.stdout and "skipped" in result.stdout


@needs_8
def test_default_command_on_8_devices(tmp_path, capsys):
  """The default command, 300 steps of up to 100 between host syncs: XLA:CPU's thread pool
  deadlocked it (an all-reduce waiting for a device whose thread the next step's launch held;
  aborted after 40 s) until nonuniform_jax.parallel asked for twice as many threads as
  devices."""
  from nonuniform_jax import main  # pylint: disable=g-import-not-at-top
  assert main.command(["nonuniform_jax.main", "--config", str(ROOT / "configs" / "default.py"),
                       "--workdir", str(tmp_path), "--config.num_steps=300",
                       "--config.progress=False"]) == 0
  out = capsys.readouterr().out
  assert "300 steps of batch 128 on 8 cpu devices" in out and "test accuracy" in out
  assert int(os.environ["PJRT_NPROC"]) >= 16


def _config(**overrides):
  return small_config(num_steps=10, log_every=5, eval_every=10, checkpoint_every=5,
                      **overrides)


def _assert_same_run(dir_a, dir_b, rtol):
  a, b = read_lines(dir_a / "metrics.jsonl"), read_lines(dir_b / "metrics.jsonl")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for key in ra:
      np.testing.assert_allclose(ra[key], rb[key], rtol=rtol, atol=1e-6, err_msg=key)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-6),
               final_params(str(dir_a)), final_params(str(dir_b)))


@needs_8
@pytest.mark.parametrize("overrides", [
    {},
    {"optimizer.name": "sam", "sam.rho": 0.1, "sam.m": 16},
    {"parallel.fully_sharded": True, "optimizer.name": "asam", "sam.rho": 0.5},
    {"optimizer.name": "csam", "csam.metric": "identity"},
], ids=["sgd", "sam-m16", "asam-fully-sharded", "csam-identity"])
def test_eight_devices_equal_one(overrides, tmp_path):
  one = train.train_and_evaluate(_config(**overrides, **{"parallel.num_devices": 1}),
                                 str(tmp_path / "one"))
  eight = train.train_and_evaluate(_config(**overrides), str(tmp_path / "eight"))
  assert one["settings"]["num_devices"] == 1 and eight["settings"]["num_devices"] == 8
  assert eight["settings"]["per_device_batch"] == 16
  assert eight["settings"]["sam_m"] == one["settings"]["sam_m"]
  _assert_same_run(tmp_path / "one", tmp_path / "eight", rtol=2e-4)


def _batchnorm_config(**overrides):
  """SAM on the smallest BatchNorm model (one 8-channel convolution-BatchNorm-ReLU layer, pooled,
  then the classifier) on the 8×8 digits, 4 steps."""
  c = small_config(num_steps=4, log_every=2, eval_every=4, checkpoint_every=4, dataset="digits",
                   **{"optimizer.name": "sam", "sam.rho": 0.1}, **overrides)
  c.model = ml_collections.ConfigDict({"name": "vgg16_bn", "stages": ((8,),)})
  return c


def _max_relative_difference(tree_a, tree_b) -> float:
  return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
             for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)))


@needs_8
def test_batchnorm_synchronised_equals_one_device_per_device_does_not(tmp_path):
  one = train.train_and_evaluate(_batchnorm_config(**{"parallel.num_devices": 1}),
                                 str(tmp_path / "one"))
  synced = train.train_and_evaluate(_batchnorm_config(), str(tmp_path / "synced"))
  local = train.train_and_evaluate(_batchnorm_config(**{"parallel.bn_sync": False}),
                                   str(tmp_path / "local"))
  assert one["settings"]["bn_statistics"] == synced["settings"]["bn_statistics"] == "global batch"
  assert local["settings"]["bn_statistics"] == "per device"
  assert local["settings"]["forward_groups"] == 8
  _assert_same_run(tmp_path / "one", tmp_path / "synced", rtol=2e-4)
  # Each device normalises its 16 examples by their own statistics: after 4 steps the parameters
  # are 6.5e-3 (relative) away from the global-statistics run; synchronised, 1.2e-7.
  assert _max_relative_difference(final_params(str(tmp_path / "one")),
                                  final_params(str(tmp_path / "local"))) > 1e-3


@needs_8
def test_checkpoint_from_8_devices_resumes_on_1(tmp_path, monkeypatch):
  reference = tmp_path / "reference"
  train.train_and_evaluate(_config(**{"parallel.num_devices": 1}), str(reference))
  real_prefetch = data.prefetch_to_device

  def crashing_prefetch(iterator, size, sharding):
    for i, batch in enumerate(real_prefetch(iterator, size, sharding)):
      if i == 7 and "mask" not in batch:   # after the step-5 checkpoint
        raise KeyboardInterrupt("simulated preemption")
      yield batch

  monkeypatch.setattr(data, "prefetch_to_device", crashing_prefetch)
  with pytest.raises(train.Interrupted):
    train.train_and_evaluate(_config(), str(tmp_path / "moved"))
  monkeypatch.setattr(data, "prefetch_to_device", real_prefetch)
  summary = train.train_and_evaluate(_config(**{"parallel.num_devices": 1}),
                                     str(tmp_path / "moved"))
  assert summary["status"] == "completed" and summary["settings"]["num_devices"] == 1
  _assert_same_run(reference, tmp_path / "moved", rtol=2e-4)


@needs_8
def test_eval_batch_rounds_up_to_the_devices(tmp_path):
  """An evaluation batch the devices do not divide (the paper configs' 1000 on 16 devices) is
  rounded up: evaluation pads and masks, so the metrics equal those of a dividing batch."""
  odd = train.train_and_evaluate(_config(eval_batch_size=100), str(tmp_path / "odd"))
  even = train.train_and_evaluate(_config(eval_batch_size=96), str(tmp_path / "even"))
  assert (odd["settings"]["eval_batch"], even["settings"]["eval_batch"]) == (104, 96)
  a = read_lines(tmp_path / "odd" / "metrics.jsonl")[-1]
  b = read_lines(tmp_path / "even" / "metrics.jsonl")[-1]
  for key in ("test_loss", "test_accuracy", "eval_train_loss", "eval_train_accuracy"):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


@needs_8
@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 100}, "batch_size 100 is not divisible by the 8 devices"),
    ({"optimizer.name": "sam", "sam.m": 32},
     "sam.m 32 must divide the per-device batch 16 (batch_size 128 over 8 devices)"),
    ({"parallel.num_devices": 9}, "parallel.num_devices 9 is not available"),
])
def test_mismatched_batch_or_m_is_a_clear_error(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=None) as info:
    train.train_and_evaluate(_config(**overrides), str(tmp_path))
  assert message in str(info.value)


def test_single_blas_thread_limits_the_lapack_jax_calls_and_restores():
  """``parallel.single_blas_thread`` (called by every command) sets every BLAS the process
  loaded, jax's CPU LAPACK (scipy's OpenBLAS) included, to one thread; the limiter restores."""
  import threadpoolctl  # pylint: disable=g-import-not-at-top
  before = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"}
  limiter = parallel.single_blas_thread()
  try:
    info = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert any("scipy" in i["filepath"] for i in info)   # the library jax's eigh runs on
    assert {i["num_threads"] for i in info} == {1}
  finally:
    limiter.restore_original_limits()
  after = {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
           if i["user_api"] == "blas"}
  assert {k: v for k, v in after.items() if k in before} == before
