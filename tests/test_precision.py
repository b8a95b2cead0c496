"""bfloat16 training: matrix products in bfloat16, everything the optimizer and the measures
compute in float32, and a loss curve close to float32's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nonuniform_jax import models, optim, steps, train
from nonuniform_jax.objective import Objective
from tests.test_train import read_lines, small_config


def _eqns(jaxpr):
  """Every equation of a (closed) jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _problem():
  model = models.get_model("mlp", 10, widths=(32, 32))
  x = jax.random.normal(jax.random.key(1), (16, 40))
  batch = {"inputs": x, "labels": jnp.arange(16) % 10}
  params = model.init(jax.random.key(0), x)["params"]
  return model, params, batch


@pytest.mark.parametrize("name", ["sgd", "sam", "csam"])
def test_bfloat16_step_multiplies_in_bfloat16_and_keeps_float32_state(name):
  model, params, batch = _problem()
  passes = {"sgd": 1, "sam": 2, "csam": 3}[name]
  tx = {"sgd": optax.sgd(0.1, momentum=0.9),
        "sam": optax.chain(optim.sam(0.05), optax.sgd(0.1, momentum=0.9)),
        "csam": optax.chain(optim.csam(0.1, 0.2, 0.9), optax.sgd(0.1, momentum=0.9))}[name]
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                           opt_state=tx.init(params))
  step = steps.make_train_step(Objective(model, precision="bfloat16"), tx, seed=0,
                               passes=passes)
  jaxpr = jax.make_jaxpr(step)(state, batch)
  # The model's matrix products (the optimizer's own reductions, e.g. CSAM's d·v diagnostic, are
  # float32 dot products of whole trees to a scalar, and stay so).
  dots = [e for e in _eqns(jaxpr.jaxpr)
          if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim >= 2]
  assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  scalar_dots = [e for e in _eqns(jaxpr.jaxpr)
                 if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim < 2]
  assert all(v.aval.dtype == jnp.float32 for e in scalar_dots for v in e.invars)
  new_state, metrics = jax.jit(step)(state, batch)
  for leaf in jax.tree.leaves((new_state.params, new_state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  assert metrics["train_loss"].dtype == jnp.float32


@pytest.mark.parametrize("tx", [optim.sam(0.05), optim.sam(0.5, adaptive=True),
                                optim.csam(0.1, 0.2, 0.9)], ids=["sam", "asam", "csam"])
def test_the_optimizer_path_never_casts_to_bfloat16(tx):
  """The SAM family's ascent norms and CSAM's consistent momentum, given float32 gradients (the
  cast's transpose returns them so), compute in float32 only."""
  _, params, _ = _problem()
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q: q))(
      grads, state, params)
  assert all(v.aval.dtype != jnp.bfloat16 for e in _eqns(jaxpr.jaxpr)
             for v in (*e.invars, *e.outvars) if hasattr(v, "aval"))


def test_measures_run_in_float32_whatever_the_training_precision():
  model, params, batch = _problem()
  fns = Objective(model, precision="bfloat16").measure_functions({}, "running")
  jaxpr = jax.make_jaxpr(fns["loss_fn"])(params, batch)
  assert not any(getattr(v, "aval", None) is not None and v.aval.dtype == jnp.bfloat16
                 for e in _eqns(jaxpr.jaxpr) for v in e.outvars)


def test_a_bfloat16_run_follows_the_float32_loss_curve(tmp_path):
  """The default MLP on MNIST-1D, 120 steps: every logged training loss of the bfloat16 run is
  within 0.005 (absolute; losses start near 2.1; measured 6.6e-4) of the float32 run's, and
  the summary records
  the precision."""
  overrides = {"num_steps": 120, "log_every": 20, "eval_every": 120, "checkpoint_every": 120}
  runs = {}
  for precision in ("float32", "bfloat16"):
    config = small_config(precision=precision, **overrides)
    summary = train.train_and_evaluate(config, str(tmp_path / precision))
    assert summary["settings"]["precision"] == precision
    runs[precision] = read_lines(tmp_path / precision / "metrics.jsonl")
  f32 = np.array([r["train_loss"] for r in runs["float32"]])
  bf16 = np.array([r["train_loss"] for r in runs["bfloat16"]])
  assert f32.shape == bf16.shape == (6,)
  np.testing.assert_allclose(bf16, f32, atol=0.005)
  assert np.any(bf16 != f32)   # it did run in another precision
  assert json.loads((tmp_path / "bfloat16" / "config.json").read_text())["precision"] == \
      "bfloat16"


def test_kronecker_factors_of_bfloat16_captures_are_float32():
  """A bfloat16 model's captures (activations, output gradients) give float32 factors and
  per-example layer gradients, equal to those of the same numbers upcast first; accumulated in
  bfloat16 the factors would differ by bfloat16's 3 significant digits."""
  from nonuniform_jax.optim import kfac  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.key(3), 2)
  x = jax.random.normal(keys[0], (64, 1, 33)).astype(jnp.bfloat16)
  s = jax.random.normal(keys[1], (64, 1, 17)).astype(jnp.bfloat16)
  got = kfac.batch_factors({"l": kfac.LayerCapture(x, s)})["l"]
  x32, s32 = x.astype(jnp.float32), s.astype(jnp.float32)
  want_a = np.einsum("btk,btl->kl", np.asarray(x32, np.float64), np.asarray(x32, np.float64)) / 64
  want_g = np.einsum("btf,btg->fg", np.asarray(s32, np.float64), np.asarray(s32, np.float64)) / 64
  assert got.a.dtype == got.g.dtype == jnp.float32
  np.testing.assert_allclose(got.a, want_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.g, want_g, rtol=1e-5, atol=1e-5)
  per_example = kfac.per_example_layer_grads({"l": kfac.LayerCapture(x, s)})["l"]
  assert per_example.dtype == jnp.float32
  np.testing.assert_allclose(per_example, np.einsum("btk,btf->bkf", x32, s32), rtol=1e-5,
                             atol=1e-5)
