"""Gradient-noise measures against brute-force per-example gradients and dense Hessians."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from nonuniform_jax import measures
from nonuniform_jax.measures import captures
from nonuniform_jax.models import get_model, layers
from nonuniform_jax.optim import kfac


def random_params(model, x, rng):
  """Parameters of ``model`` drawn with numpy (kernels N(0, 1/fan_in), scales 1 + N(0, 0.01),
  the rest N(0, 0.01)): no PRNG program to compile, which costs seconds on a CPU."""
  def draw(path, s):
    name = path[-1].key
    std = 1 / np.sqrt(np.prod(s.shape[:-1])) if name == "kernel" else 0.1
    return jnp.asarray((name == "scale") + std * rng.normal(size=s.shape), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  return jax.tree_util.tree_map_with_path(draw, shapes)


class Problem:
  """A model, its parameters, a batch of n examples (inputs [n, ...] drawn N(0, 1), labels
  i mod 3) and the loss functions the measures take."""

  def __init__(self, model, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    self.model = model
    self.batch = {"x": x, "y": jnp.arange(shape[0]) % 3}
    self.params = random_params(model, x, rng)
    self.n = shape[0]
    # BatchNorm running statistics, if any: means N(0, 0.25), variances in [0.5, 1.5).
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    stats = {"batch_stats": jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(0.5 * rng.normal(size=s.shape) if path[-1].key == "mean"
                                    else 0.5 + rng.uniform(size=s.shape), jnp.float32),
        shapes["batch_stats"])} if "batch_stats" in shapes else {}

    def per_example(params, batch):
      logits = model.apply({"params": params, **stats}, batch["x"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    def capture(params, perturbations, batch):
      logits, state = model.apply({"params": params, "perturbations": perturbations, **stats},
                                  batch["x"], mutable=["kfac"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), state["kfac"]

    self.per_example_loss_fn = per_example
    self.loss_fn = lambda params, batch: jnp.mean(per_example(params, batch))
    self.capture_loss_fn = capture
    self.perturbations_fn = lambda batch: layers.zero_perturbations(
        model, {"params": self.params, **stats}, batch["x"])

  def split(self, *sizes):
    """The batch cut into consecutive batches of ``sizes``."""
    edges = np.cumsum((0,) + sizes)
    return [jax.tree.map(lambda x: x[a:b], self.batch) for a, b in zip(edges[:-1], edges[1:])]

  def grads(self):
    """Brute force: G [n, P] (float64), row i = ∇ℓ_i ravelled, by jax.grad of one example at a
    time in a Python loop (no vmap, unlike the code under test); and the layer of every
    column."""
    flat, unravel = ravel_pytree(self.params)
    one = jax.jit(lambda example: jax.grad(lambda f: self.loss_fn(unravel(f), example))(flat))
    g = np.stack([np.asarray(one(jax.tree.map(lambda x, i=i: x[i:i + 1], self.batch)),
                             np.float64) for i in range(self.n)])
    names = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(self.params)[0]:
      names += ["/".join(str(k.key) for k in path[:-1])] * leaf.size
    return g, np.asarray(names)


@pytest.fixture(scope="module")
def mlp():
  return Problem(get_model("mlp", 3, widths=(8,)), (13, 4))


def brute_statistics(g, names, params):
  mean = g.mean(0)
  var = g.var(0)
  theta = np.asarray(ravel_pytree(params)[0], np.float64)
  n = g.shape[0]
  trace = var.sum()
  grad_sq = mean @ mean
  keep = var > 0
  gsnr = mean[keep] ** 2 / var[keep]
  return {
      "trace_sigma": np.mean(np.sum((g - mean) ** 2, 1)),
      "trace_sigma_unbiased": trace * n / (n - 1),
      "grad_norm_sq": grad_sq,
      "mean_sq_grad_norm": np.mean(np.sum(g ** 2, 1)),
      "trace_sigma_adaptive": np.mean(np.sum(((g - mean) * np.abs(theta)) ** 2, 1)),
      "noise_scale": trace / grad_sq,
      "gradient_diversity": np.sum(g ** 2) / np.sum(g.sum(0) ** 2),
      "gsnr_mean": gsnr.mean(),
      "gsnr_median": np.median(gsnr),
      "gsnr_num_params": keep.sum(),
      "trace_sigma_layers": {k: var[names == k].sum() for k in np.unique(names)},
  }


def assert_statistics(out, expected, rtol, keys=None):
  for key in keys or expected:
    if key.startswith("gsnr"):
      # ḡ_j²/Var_j from float32 gradients carries a relative error of about ε·GSNR_j, in the
      # code under test and in the oracle's own (differently rounded) float32 gradients.
      np.testing.assert_allclose(out[key], expected[key], rtol=300 * rtol, err_msg=key)
    elif key == "trace_sigma_layers":
      assert out[key].keys() == expected[key].keys()
      for layer in expected[key]:
        np.testing.assert_allclose(out[key][layer], expected[key][layer], rtol=rtol, err_msg=layer)
    else:
      np.testing.assert_allclose(out[key], expected[key], rtol=rtol, err_msg=key)


TRACE_FAMILY = ("trace_sigma", "trace_sigma_unbiased", "grad_norm_sq", "mean_sq_grad_norm",
                "noise_scale", "gradient_diversity", "trace_sigma_layers")


def test_gradient_noise_against_per_example_gradients(mlp):
  g, names = mlp.grads()
  expected = brute_statistics(g, names, mlp.params)
  assert expected["gsnr_num_params"] > 10
  # Two batches (8 and 5 examples), chunks of 4: one batch divides, the other is padded.
  split = measures.gradient_noise(mlp.loss_fn, mlp.params, mlp.split(8, 5), chunk_size=4)
  assert_statistics(split, expected, rtol=2e-5)
  assert (split["num_examples"], split["num_batches"], split["method"]) == (13, 2, "chunked")
  # The union at once, unchunked, through the given per-example loss.
  whole = measures.gradient_noise(mlp.loss_fn, mlp.params, [mlp.batch], chunk_size=13,
                                  per_example_loss_fn=mlp.per_example_loss_fn)
  assert_statistics(whole, expected, rtol=2e-5)
  np.testing.assert_allclose(measures.per_example_loss(mlp.loss_fn)(mlp.params, mlp.batch),
                             mlp.per_example_loss_fn(mlp.params, mlp.batch), rtol=1e-6)


def test_centred_accumulation_keeps_small_noise():
  # g_i = 1 + ε_i, ε_i ~ 1e-3: mean‖g_i‖² − ‖ḡ‖² computed in float32 would keep no digit.
  rng = np.random.default_rng(0)
  batch = {"e": rng.normal(size=(40, 3)).astype(np.float32) * 1e-3}
  loss_fn = lambda w, b: jnp.mean(b["e"] @ w + jnp.sum(w))
  out = measures.gradient_noise(loss_fn, jnp.zeros(3), [batch], chunk_size=7)
  e = batch["e"].astype(np.float64)
  np.testing.assert_allclose(out["trace_sigma"], np.sum(e.var(0)), rtol=1e-3)


class SmallCNN(nn.Module):
  """Convolutions with stride and explicit asymmetric padding, then a classifier."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(layers.Conv(3, (3, 3), strides=(2, 2), padding="SAME")(x))
    x = nn.tanh(layers.Conv(4, (2, 2), strides=(1, 2), padding=((1, 0), (0, 1)))(x))
    return layers.Dense(3)(x.reshape(x.shape[0], -1))


class TokenBlock(nn.Module):
  """A ViT-style block on tokens [b, T, d]: attention and an MLP from layers.Dense, mean pool."""

  @nn.compact
  def __call__(self, x):
    q, k, v = (layers.Dense(4, name=name)(x) for name in ("query", "key", "value"))
    attention = nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 2.0)
    x = x + layers.Dense(4, name="out")(jnp.einsum("bts,bsd->btd", attention, v))
    x = x + layers.Dense(4)(nn.gelu(layers.Dense(8)(x)))
    return layers.Dense(3, name="head")(x.mean(axis=1))


class NormedCNN(nn.Module):
  """BatchNorm (running statistics, as the measures apply it) after a convolution and after a
  Dense layer: exact per-example norms of its scale and offset on the fast path too."""
  running: bool = True

  @nn.compact
  def __call__(self, x):
    x = layers.Conv(3, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)(x)
    x = nn.relu(layers.BatchNorm(use_running_average=self.running)(x))
    x = layers.Dense(4)(x.reshape(x.shape[0], -1))
    x = nn.tanh(layers.BatchNorm(use_running_average=self.running)(x))
    return layers.Dense(3)(x)


FAST_CASES = {
    "cnn": lambda: Problem(SmallCNN(), (6, 7, 6, 2)),
    "token_block": lambda: Problem(TokenBlock(), (6, 3, 4)),
    "batchnorm": lambda: Problem(NormedCNN(), (6, 7, 6, 2)),
}


@pytest.mark.parametrize("case", ["mlp", *FAST_CASES])
def test_fast_path_equals_per_example_gradients(case, mlp):
  problem = mlp if case == "mlp" else FAST_CASES[case]()
  g, names = problem.grads()
  expected = brute_statistics(g, names, problem.params)
  sizes = {"mlp": (8, 5), "batchnorm": (4, 2)}.get(case, (3, 3))  # unequal, or one stacked
  fast = measures.gradient_noise(problem.loss_fn, problem.params, problem.split(*sizes),
                                 capture_loss_fn=problem.capture_loss_fn,
                                 perturbations_fn=problem.perturbations_fn)
  assert fast["method"] == "fast"
  assert "gsnr_mean" not in fast
  assert_statistics(fast, expected, rtol=1e-4, keys=TRACE_FAMILY)
  if case != "mlp":  # the chunked path on the same model (the MLP's is tested above)
    slow = measures.gradient_noise(problem.loss_fn, problem.params, [problem.batch],
                                   method="chunked", chunk_size=4)  # 6 = 4 + 2 (overlapping)
    assert_statistics(slow, expected, rtol=2e-5)
    assert_statistics(fast, slow, rtol=1e-4, keys=TRACE_FAMILY)


def test_fast_path_in_chunks_and_its_cancellation_guard(mlp, monkeypatch):
  """The fast path captures as many examples at once as fit capture_bytes (one example of
  this MLP: inputs with a bias column 5 + 9, output gradients 8 + 3 floats, 100 bytes; 400 bytes
  make 13 = 4 + 4 + 4 + 1) with the same result; 'auto' reruns chunked when tr Σ is too small
  against mean‖g_i‖² for float32."""
  kwargs = dict(capture_loss_fn=mlp.capture_loss_fn, perturbations_fn=mlp.perturbations_fn)
  assert captures.capture_bytes_per_example(
      mlp.capture_loss_fn, mlp.perturbations_fn, mlp.params, mlp.batch) == 100
  whole = measures.gradient_noise(mlp.loss_fn, mlp.params, [mlp.batch], method="fast", **kwargs)
  sizes, real = [], captures._weighted
  def recording(capture, perts, params, batch, weight, with_factors):
    sizes.append(len(batch["y"]))
    return real(capture, perts, params, batch, weight, with_factors=with_factors)
  monkeypatch.setattr(captures, "_weighted", recording)
  parts = measures.gradient_noise(mlp.loss_fn, mlp.params, [mlp.batch], method="fast",
                                  capture_bytes=400, **kwargs)
  assert sizes == [4, 4, 4, 1]
  assert_statistics(parts, whole, rtol=1e-5, keys=TRACE_FAMILY)
  rng = np.random.default_rng(1)   # almost the same example 13 times: tr Σ ≈ 1e-8 mean‖g_i‖²
  x = np.asarray(mlp.batch["x"][:1]) + 1e-4 * rng.normal(size=mlp.batch["x"].shape)
  same = {"x": jnp.asarray(x, jnp.float32), "y": jnp.zeros(13, jnp.int32)}
  auto = measures.gradient_noise(mlp.loss_fn, mlp.params, [same], **kwargs)
  assert auto["method"] == "chunked" and "cancellation" in auto["method_reason"]
  forced = measures.gradient_noise(mlp.loss_fn, mlp.params, [same], method="fast", **kwargs)
  assert forced["method"] == "fast"


def test_fast_path_falls_back_when_a_parameter_is_not_captured():
  class Normed(nn.Module):
    @nn.compact
    def __call__(self, x):
      return layers.Dense(3)(nn.LayerNorm()(layers.Dense(5)(x)))

  problem = Problem(Normed(), (5, 4))
  kwargs = dict(capture_loss_fn=problem.capture_loss_fn,
                perturbations_fn=problem.perturbations_fn, chunk_size=5)
  out = measures.gradient_noise(problem.loss_fn, problem.params, [problem.batch], **kwargs)
  assert out["method"] == "chunked" and "LayerNorm_0" in out["method_reason"]
  assert out["trace_sigma"] > 0 and "gsnr_mean" in out
  with pytest.raises(ValueError, match="method"):
    measures.gradient_noise(problem.loss_fn, problem.params, [problem.batch], method="fastest")
  with pytest.raises(ValueError, match="capture_loss_fn"):
    measures.gradient_noise(problem.loss_fn, problem.params, [problem.batch], method="fast")


def test_batchnorm_is_captured_with_running_statistics_only():
  """With running statistics BatchNorm is covered and has no Kronecker factors (K-FAC leaves it
  alone); with batch statistics it is not captured and the fast path falls back."""
  running = FAST_CASES["batchnorm"]()
  perts = running.perturbations_fn(running.batch)
  assert kfac.layer_names(perts) == ["Conv_0", "Dense_0", "Dense_1"]
  assert kfac.norm_layer_names(perts) == ["BatchNorm_0", "BatchNorm_1"]
  structure = measures.kfac_structure(running.capture_loss_fn, running.params, [running.batch],
                                      perturbations_fn=running.perturbations_fn)
  assert sorted(structure["layers"]) == ["Conv_0", "Dense_0", "Dense_1"]
  assert len(structure["uncovered"]) == 4   # the two BatchNorm scales and offsets

  model, x = NormedCNN(running=False), running.batch["x"]
  variables = model.init(jax.random.key(0), x)
  perts = layers.zero_perturbations(model, variables, x)
  assert kfac.norm_layer_names(perts) == [] and len(kfac.layer_names(perts)) == 3
  _, state = model.apply({**variables, "perturbations": perts}, x,
                         mutable=["kfac", "batch_stats"])
  assert sorted(state["kfac"]) == ["Conv_0", "Dense_0", "Dense_1"]
  missing = captures.uncovered(
      variables["params"], None, lambda b: layers.zero_perturbations(model, variables, b),
      [(x, np.int32(0))])
  assert len(missing) == 4 and all("BatchNorm" in m for m in missing)


def test_kfac_structure_against_captures_and_brute_force(mlp):
  out = measures.kfac_structure(mlp.capture_loss_fn, mlp.params, mlp.split(8, 5),
                                perturbations_fn=mlp.perturbations_fn)
  # Oracle for the Kronecker-factored values: kfac's own functions on the union in one batch.
  @jax.jit
  def oracle(params, batch):
    captures = kfac.loss_grad_and_captures(mlp.capture_loss_fn, params,
                                           mlp.perturbations_fn(batch), batch).captures
    factors = kfac.batch_factors(captures)
    return kfac.traces(captures), kfac.effective_rank(factors), kfac.effective_rank_centred(
        factors, kfac.mean_grads(captures))

  traces, ranks, ranks_centred = oracle(mlp.params, mlp.batch)
  g, names = mlp.grads()
  var = g.var(0)
  assert sorted(out["layers"]) == ["Dense_0", "Dense_1"] and out["uncovered"] == []
  for name, layer in out["layers"].items():
    np.testing.assert_allclose(layer["kfac_trace"], traces[name].kfac_uncentred, rtol=1e-5)
    np.testing.assert_allclose(layer["kfac_trace_centred"], traces[name].kfac_centred, rtol=1e-5)
    np.testing.assert_allclose(layer["effective_rank"], ranks[name], rtol=1e-5)
    np.testing.assert_allclose(layer["effective_rank_centred"], ranks_centred[name], rtol=1e-4)
    np.testing.assert_allclose(layer["trace_sigma"], var[names == name].sum(), rtol=1e-4)
    np.testing.assert_allclose(layer["mean_sq_grad_norm"],
                               np.mean(np.sum(g[:, names == name] ** 2, 1)), rtol=1e-5)
  np.testing.assert_allclose(out["trace_sigma"], var.sum(), rtol=1e-4)


def test_batch_gradient_noise_exact_for_a_shuffle_and_unbiased_on_average(mlp):
  g, _ = mlp.grads()
  n, b = mlp.n, 4
  k = n // b
  trace = g.var(0).sum()

  def brute(order):
    batch_grads = g[order[:k * b]].reshape(k, b, -1).mean(1)
    return np.sum((batch_grads - batch_grads.mean(0)) ** 2) / (k - 1)

  out = measures.batch_gradient_noise(mlp.loss_fn, mlp.params, mlp.split(8, 5), b, key=7,
                                      chunk_size=4)
  order = np.asarray(jax.random.permutation(jax.random.key(7), n))
  np.testing.assert_allclose(out["batch_noise"], brute(order), rtol=1e-4)
  np.testing.assert_allclose(out["trace_sigma"], trace, rtol=1e-5)
  assert (out["num_batches"], out["batch_size"], out["num_examples"]) == (k, b, n)

  # The expectations over shuffles, tightly on the brute-force gradients ...
  rng = np.random.default_rng(0)
  samples = np.array([brute(rng.permutation(n)) for _ in range(10000)])
  np.testing.assert_allclose(samples.mean(), n / (n - 1) * trace / b, rtol=0.02)
  np.testing.assert_allclose(samples.mean() * (n - b) / n, (n - b) / (b * (n - 1)) * trace,
                             rtol=0.02)
  # ... and through the function itself, within 4 standard errors.
  runs = [measures.batch_gradient_noise(mlp.loss_fn, mlp.params, [mlp.batch], b, key=seed,
                                        trace_sigma=out["trace_sigma"]) for seed in range(100)]
  for name in ("batch_noise", "batch_noise_finite"):
    values = np.array([r[name] for r in runs])
    error = values.std() / np.sqrt(len(values))
    assert abs(values.mean() - runs[0][name + "_predicted"]) < 4 * error, name
  with pytest.raises(ValueError, match="batch_size"):
    measures.batch_gradient_noise(mlp.loss_fn, mlp.params, [mlp.batch], 7)


def test_wu_nonuniformity_against_dense_per_example_hessians(mlp):
  flat, unravel = ravel_pytree(mlp.params)
  def hessian(example):
    single = jax.tree.map(lambda x: x[None], example)
    return jax.hessian(lambda f: mlp.loss_fn(unravel(f), single))(flat)
  h = np.asarray(jax.jit(jax.vmap(hessian))(mlp.batch), np.float64)
  mean = h.mean(0)
  m = np.einsum("nij,njk->ik", h, h) / mlp.n - mean @ mean
  expected = np.linalg.eigvalsh(m)[-1]
  out = measures.wu_nonuniformity(mlp.loss_fn, mlp.params, mlp.split(8, 5), chunk_size=3,
                                  num_iters=300, tol=1e-5, key=1)
  assert out["converged"]
  np.testing.assert_allclose(out["lambda_max"], expected, rtol=1e-4)
  np.testing.assert_allclose(out["nonuniformity"], np.sqrt(expected), rtol=1e-4)


def test_wu_nonuniformity_one_dimensional_toy():
  """docs/experiments.md §1: f = ½(f1 + f2); sharpness 2 at both minima, s = 0 at 0 and 1.8 at 1."""
  def per_example(x, batch):
    f1 = jnp.minimum(x ** 2, 0.1 * (x - 1) ** 2)
    f2 = jnp.minimum(x ** 2, 1.9 * (x - 1) ** 2)
    return jnp.where(batch["i"] == 0, f1, f2)

  loss_fn = lambda x, batch: jnp.mean(per_example(x, batch))
  batches = [{"i": jnp.arange(2)}]
  for x, s in ((0.0, 0.0), (1.0, 1.8)):
    out = measures.wu_nonuniformity(loss_fn, jnp.float32(x), batches,
                                    per_example_loss_fn=per_example)
    np.testing.assert_allclose(out["nonuniformity"], s, atol=1e-5)
    sharpness = measures.lambda_max(loss_fn, jnp.float32(x), batches, num_iters=1)
    np.testing.assert_allclose(sharpness["lambda_max"], 2.0, rtol=1e-6)
