"""Measures inside training runs (on a schedule, with their settings) and on a finished run's
checkpoint through the measure command."""

import json
import pathlib
import zlib

import jax
import numpy as np
import pytest

from nonuniform_jax.objective import Objective
from nonuniform_jax import evaluators, measure, measures, models, train
from tests.test_train import read_lines, small_config


def _config(**overrides):
  return small_config(**{"num_steps": 20, "log_every": 10, "eval_every": 10,
                         "checkpoint_every": 10, "train_eval_examples": 64,
                         "measures.num_examples": 64, "measures.batch_size": 32,
                         "measures.every_steps": 10,
                         "measures.names": ("lambda_max", "sam_sharpness"),
                         "measures.settings.lambda_max.num_iters": 30, **overrides})


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("measured")
  config = _config(measure_nonuniformity=True,
                   **{"measures.settings.wu_nonuniformity.num_iters": 20,
                      "measures.settings.batch_gradient_noise.batch_size": 16})
  return workdir, train.train_and_evaluate(config, str(workdir))


def test_measures_on_schedule_with_settings(measured_run):
  workdir, summary = measured_run
  lines = read_lines(workdir / "metrics.jsonl")
  for record in lines:   # steps 10 and 20
    assert record["measure/lambda_max/lambda_max"] > 0
    assert record["measure/gradient_noise/trace_sigma"] > 0
    assert "measure/wu_nonuniformity/nonuniformity" in record
    assert "measure/diagnostics/class_loss_imbalance" in record
    # The measures' loss is the training-subset evaluation loss: same examples, same mode.
    np.testing.assert_allclose(record["measure/sam_sharpness/loss"], record["eval_train_loss"],
                               rtol=1e-5)
  logged = read_lines(workdir / "measures.jsonl")
  assert [r["step"] for r in logged] == [10, 20]
  assert logged[0]["lambda_max"]["num_iters"] == 30
  assert logged[0]["gradient_noise"]["num_examples"] == 64
  assert logged[0]["gradient_noise"]["subset_batch_size"] == 32
  assert logged[0]["batch_gradient_noise"]["num_batches"] == 4
  assert logged[0]["gradient_noise"]["bn_mode"] == "running"
  assert set(summary["measures"]) == {"lambda_max", "sam_sharpness", *evaluators.NONUNIFORMITY}


def test_measure_command_on_a_finished_run(measured_run):
  workdir, summary = measured_run
  # As a run made before data_seed existed wrote it: the command reads the key as -1.
  config = json.loads((workdir / "config.json").read_text())
  config.pop("data_seed")
  (workdir / "config.json").write_text(json.dumps(config))
  results = measure.measure(str(workdir), ["hessian_trace"], num_examples=48,
                            overrides=["hessian_trace.num_probes=7"])
  assert results["hessian_trace"]["num_probes"] == 7
  assert results["hessian_trace"]["num_examples"] == 48
  logged = read_lines(workdir / "measures.jsonl")
  assert logged[-1]["step"] == 20 and "hessian_trace" in logged[-1]
  saved = json.loads((workdir / "summary.json").read_text())
  assert saved["measures"]["hessian_trace"]["trace"] == results["hessian_trace"]["trace"]
  assert saved["final"] == summary["final"]   # the run's own results are untouched


def test_evaluator_matches_direct_call_on_the_same_model():
  model = models.get_model("mlp", 3, widths=(8,))
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.normal(size=(20, 5)).astype(np.float32),
              "labels": rng.integers(0, 3, 20)}]
  params = model.init(jax.random.key(0), batches[0]["inputs"])["params"]
  got = evaluators.run(["hessian_trace"], {"hessian_trace": {"num_probes": 5}}, model, params,
                       {}, batches, seed=3)
  fns = Objective(model).measure_functions({}, "running")
  want = measures.hessian_trace(fns["loss_fn"], params, batches, num_probes=5,
                                key=jax.random.fold_in(jax.random.key(3),
                                                       zlib.crc32(b"hessian_trace")))
  np.testing.assert_allclose(got["hessian_trace"]["trace"], want["trace"], rtol=1e-6)


def test_a_measures_draws_do_not_depend_on_the_others():
  """The key of a measure that draws comes from its name: batch_gradient_noise alone and after
  gradient_noise shuffles the same way (it used to take the key of its position in the list)."""
  model = models.get_model("mlp", 3, widths=(8,))
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.normal(size=(32, 5)).astype(np.float32),
              "labels": rng.integers(0, 3, 32)}]
  params = model.init(jax.random.key(0), batches[0]["inputs"])["params"]
  settings = {"batch_gradient_noise": {"batch_size": 4}, "gradient_noise": {}}
  alone = evaluators.run(["batch_gradient_noise"], settings, model, params, {}, batches)
  after = evaluators.run(["gradient_noise", "batch_gradient_noise"], settings, model, params, {},
                         batches)
  other = evaluators.run(["batch_gradient_noise"], settings, model, params, {}, batches, seed=1)
  assert alone["batch_gradient_noise"]["batch_noise"] == after["batch_gradient_noise"][
      "batch_noise"] != other["batch_gradient_noise"]["batch_noise"]


@pytest.mark.parametrize("overrides, message", [
    ({"measures.names": ("lambda_maximum",)}, "unknown measure 'lambda_maximum'"),
    ({"measures.bn_mode": "eval"}, "unknown measures.bn_mode 'eval'"),
    ({"measures.settings.sam_sharpness.rho": 0.1, "measures.names": ("sam_sharpness",),
      "measures.num_examples": 0}, "measures.num_examples must be an integer >= 1, got 0"),
    ({"measure_nonuniformity": True}, "batch_gradient_noise.batch_size 128 needs at least 2 "
                                      "disjoint batches of the 64 measured examples; choose 1 to 32"),
])
def test_bad_measure_settings(overrides, message, tmp_path):
  with pytest.raises(ValueError) as info:
    train.train_and_evaluate(_config(**overrides), str(tmp_path / "w"))
  assert message in str(info.value)
  assert not (tmp_path / "w").exists()


def test_measure_command_errors(tmp_path):
  with pytest.raises(ValueError, match="no run in workdir"):
    measure.measure(str(tmp_path), ["lambda_max"])


def test_later_evaluations_reuse_compilations():
  """New parameters and BatchNorm statistics are traced arguments of the measures' functions:
  a second evaluation compiles nothing, in either BatchNorm mode."""
  from nonuniform_jax.measures import hessian  # pylint: disable=g-import-not-at-top
  from tests.test_train_step import TinyBN  # pylint: disable=g-import-not-at-top
  model = TinyBN()
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.normal(size=(8, 6, 6, 3)).astype(np.float32),
              "labels": rng.integers(0, 3, 8)}]
  variables = model.init(jax.random.key(0), batches[0]["inputs"])
  names = ["lambda_max", "gradient_noise"]
  settings = {"lambda_max": {"num_iters": 5}, "gradient_noise": {"method": "chunked"}}
  objective = Objective(model)   # built once per run, as the trainer does
  for bn_mode in ("running", "batch"):
    first = evaluators.run(names, settings, objective, variables["params"],
                           variables["batch_stats"], batches, bn_mode=bn_mode)
    compiled = hessian._top_eigenvalues._cache_size()
    params = jax.tree.map(lambda p: p + 0.1, variables["params"])
    stats = jax.tree.map(lambda s: s + 0.5, variables["batch_stats"])
    second = evaluators.run(names, settings, objective, params, stats, batches, bn_mode=bn_mode)
    assert hessian._top_eigenvalues._cache_size() == compiled
    assert second["lambda_max"]["lambda_max"] != first["lambda_max"]["lambda_max"]
