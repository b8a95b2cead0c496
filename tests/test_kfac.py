"""K-FAC capture (models/layers.py) and factors (optim/kfac.py) against exact oracles.

Oracles: lax.conv_general_dilated (patches), per-example gradients from jax.vmap(jax.grad),
known output gradients of a linear probe loss, dense Kronecker products (np.kron) and dense
solves, and a Monte-Carlo second moment for the location approximation.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from nonuniform_jax.models import get_model, layers
from nonuniform_jax.models.layers import Conv, Dense, zero_perturbations
from nonuniform_jax.optim import kfac


def normal(seed, shape):
  """Standard normal test data from numpy (jax.random would compile threefry per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def vec(m):
  """Column-major vec, the convention of G ⊗ A."""
  return np.asarray(m, np.float64).ravel(order="F")


class TinyNet(nn.Module):
  """Strided/padded/dilated convolutions, a token-wise Dense, a bias-free Dense."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.relu(Conv(3, (3, 3), strides=2, padding="SAME")(x))
    x = Conv(4, (2, 2), padding=((1, 0), (0, 2)), kernel_dilation=2, use_bias=False)(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1])          # tokens [B, T, C]
    x = jnp.mean(nn.gelu(Dense(5)(x)), axis=1)
    return Dense(3, use_bias=False)(x)


PROBLEMS = {
    "mlp": lambda: (get_model("mlp", 3, widths=(6,)), normal(1, (5, 4))),
    "tiny": lambda: (TinyNet(), normal(1, (3, 7, 6, 2))),
}


def per_example_loss_of(model):
  def per_example_loss(p, q, x, y):
    logits, state = model.apply({"params": p, "perturbations": q}, x, mutable=["kfac"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y), state["kfac"]
  return per_example_loss


@functools.lru_cache(maxsize=None)
def solve(name, batch=None):
  """Everything the tests compare for problem ``name`` (first ``batch`` examples), computed in
  ONE jitted call: eager dispatch compiles every primitive separately and would dominate."""
  model, x = PROBLEMS[name]()
  x = x[:batch]
  y = jnp.arange(x.shape[0]) % 3
  per_example_loss = per_example_loss_of(model)

  def single_loss(p, xi, yi):
    logits = model.apply({"params": p}, xi[None])
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

  @jax.jit
  def run():
    params = model.init(jax.random.key(0), x)["params"]
    perts = zero_perturbations(model, {"params": params}, x)
    out = kfac.loss_grad_and_captures(per_example_loss, params, perts, x, y)
    names = list(out.captures)
    brute = jax.vmap(jax.grad(single_loss), (None, 0, 0))(params, x, y)
    factors = kfac.batch_factors(out.captures)
    return dict(
        params=params, perturbations=perts, out=out,
        brute=jax.vmap(lambda g: kfac.to_layer_matrices(g, names))(brute),
        brute_tree=brute,
        per_example=kfac.per_example_layer_grads(out.captures),
        norms=kfac.per_example_sq_norms(out.captures),
        means=kfac.mean_grads(out.captures),
        grads=kfac.to_layer_matrices(out.grads, names),
        reference_grads=jax.grad(lambda p: jnp.mean(per_example_loss(p, perts, x, y)[0]))(params),
        factors=factors, ranks=kfac.effective_rank(factors), traces=kfac.traces(out.captures),
        ranks_centred=kfac.effective_rank_centred(factors, kfac.mean_grads(out.captures)))

  result = run()
  result["names_check"] = kfac.layer_names(result["perturbations"]) == list(
      result["out"].captures)
  return model, x, y, result


@pytest.fixture(params=sorted(PROBLEMS))
def solved(request):
  return solve(request.param)[-1]


# ------------------------------------------------------------------------------- capture


@pytest.mark.parametrize("kernel,strides,padding,in_dil,k_dil", [
    ((3, 3), (2, 2), "SAME", (1, 1), (1, 1)),
    ((2, 3), (1, 2), "VALID", (1, 1), (2, 1)),
    ((3, 2), (2, 1), ((2, 0), (1, 3)), (2, 1), (1, 2)),
    ((3,), (2,), "SAME_LOWER", (1,), (2,)),
])
def test_patches_reproduce_the_convolution(kernel, strides, padding, in_dil, k_dil):
  rank = len(kernel)
  x = normal(0, (2,) + (7, 6)[:rank] + (3,))
  w = normal(1, kernel + (3, 4))
  dn = ("NHWC", "HWIO", "NHWC") if rank == 2 else ("NWC", "WIO", "NWC")
  conv, patches = jax.jit(lambda x, w: (
      lax.conv_general_dilated(x, w, strides, padding, in_dil, k_dil, dimension_numbers=dn,
                               precision=lax.Precision.HIGHEST),
      layers.conv_patches(x, kernel, strides, padding, in_dil, k_dil)))(x, w)
  np.testing.assert_allclose(patches @ w.reshape(-1, 4), conv, rtol=1e-5, atol=1e-5)
  if in_dil == (1,) * rank:  # lax's patches are channel-major: c·P + p versus ours p·C + c
    theirs = jax.jit(lambda x: lax.conv_general_dilated_patches(
        x, kernel, strides, padding, rhs_dilation=k_dil, dimension_numbers=dn,
        precision=lax.Precision.HIGHEST))(x)
    theirs = theirs.reshape(theirs.shape[:-1] + (3, -1)).swapaxes(-1, -2)
    np.testing.assert_allclose(patches, theirs.reshape(patches.shape), rtol=1e-6, atol=1e-6)


def test_captures_give_the_per_example_gradients(solved):
  assert solved["names_check"]
  for n, want in solved["brute"].items():
    np.testing.assert_allclose(solved["per_example"][n], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(solved["norms"][n], np.sum(np.square(want), (1, 2)), rtol=1e-4,
                               atol=1e-9)
    np.testing.assert_allclose(solved["means"][n], np.mean(want, 0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(solved["grads"][n], np.mean(want, 0), rtol=1e-4, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               solved["out"].grads, solved["reference_grads"])


def test_both_norm_routes_are_used():
  """The Gram and the direct route of per_example_sq_norms agree with the brute force above;
  check that TinyNet exercises both (conv with many locations: direct; tokens: Gram)."""
  model, x = PROBLEMS["tiny"]()
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  _, state = jax.eval_shape(lambda p: model.apply(p, x, mutable=["kfac", "perturbations"]),
                            params)
  inputs = jax.tree.leaves(state["kfac"])
  outputs = jax.tree.leaves(state["perturbations"])
  routes = [np.prod(o.shape[1:-1]) * (i.shape[2] + o.shape[-1]) <= i.shape[2] * o.shape[-1]
            for i, o in zip(inputs, outputs)]
  assert len(inputs) == 4 and set(routes) == {True, False}, routes


def test_probe_loss_gives_the_output_gradients_and_factors():
  """ℓ_i = Σ_t u_{i,t}·y_{i,t} has s_{i,t} = u_{i,t} exactly; A is checked against
  lax.conv_general_dilated_patches (reordered), G against u."""
  conv = Conv(4, (3, 3), strides=2, padding="SAME")
  x = normal(0, (3, 5, 5, 2))
  params = {"kernel": normal(3, (3, 3, 2, 4)), "bias": normal(4, (4,))}
  perts = zero_perturbations(conv, {"params": params}, x)
  u = normal(2, perts["outputs"].shape)

  def per_example_loss(p, q):
    y, state = conv.apply({"params": p, "perturbations": q}, x, mutable=["kfac"])
    return jnp.sum(u * y, axis=(1, 2, 3)), state["kfac"]

  cap, f = jax.jit(lambda p, q: (lambda c: (c, kfac.batch_factors({"": c})[""]))(
      kfac.loss_grad_and_captures(per_example_loss, p, q).captures[""]))(params, perts)
  b, t = 3, 9
  np.testing.assert_allclose(cap.out_grads, u.reshape(b, t, 4), rtol=1e-6)
  theirs = jax.jit(lambda x: lax.conv_general_dilated_patches(
      x, (3, 3), (2, 2), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC"),
      precision=lax.Precision.HIGHEST))(x)
  xbar = np.concatenate([np.asarray(theirs).reshape(b, t, 2, 9).swapaxes(-1, -2).reshape(b, t, 18),
                         np.ones((b, t, 1))], -1)
  np.testing.assert_allclose(f.a, np.einsum("btk,btl->kl", xbar, xbar) / b, rtol=1e-4, atol=1e-5)
  uu = np.asarray(u).reshape(b * t, 4)
  np.testing.assert_allclose(f.g, uu.T @ uu / (b * t), rtol=1e-5, atol=1e-6)


def test_no_capture_costs_nothing_and_init_is_clean():
  """Without 'kfac' mutable and without perturbations the layers trace exactly like nn.Dense /
  nn.Conv; model.init creates neither capture collection; a call is one module call."""
  x = jnp.ones((2, 5, 5, 3))
  for ours, theirs in ((Dense(4), nn.Dense(4)), (Conv(4, (3, 3), strides=2), nn.Conv(4, (3, 3),
                                                                                   strides=2))):
    variables = jax.eval_shape(ours.init, jax.random.key(0), x)
    assert list(variables) == ["params"]
    assert str(jax.make_jaxpr(ours.apply)(variables, x)) == str(
        jax.make_jaxpr(theirs.apply)(variables, x))
    _, state = jax.eval_shape(lambda v: ours.apply(v, x, capture_intermediates=True,
                                                   mutable=["intermediates"]), variables)
    assert len(state["intermediates"]["__call__"]) == 1  # one module call, not two


def test_a_layer_called_twice_is_refused_when_captured():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      layer = Dense(3)
      return layer(nn.relu(layer(x)))

  model, x = Twice(), jnp.ones((2, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  jax.eval_shape(model.apply, variables, x)  # fine without capture
  with pytest.raises(ValueError, match="called twice"):
    jax.eval_shape(lambda v: model.apply(v, x, mutable=["kfac"]), variables)


def test_unsupported_conv_capture_raises():
  conv, x = Conv(2, (3, 3), padding="CIRCULAR"), jnp.ones((1, 4, 4, 1))
  variables = jax.eval_shape(conv.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="CIRCULAR"):
    jax.eval_shape(lambda v: conv.apply(v, x, mutable=["kfac"]), variables)


# ---------------------------------------------------------------------- factors and traces


def test_factors_are_exact_for_one_example_and_the_moments_of_the_batch():
  """T = 1: G ⊗ A is the second moment of the per-example gradient for one example exactly;
  for B examples A = E[x̄x̄ᵀ] with x̄ = [x, 1] and G = E[ssᵀ] with s = the per-example bias
  gradient (both brute force)."""
  _, x, _, solved = solve("mlp")
  f = solved["factors"]["Dense_0"]
  xbar = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
  s = np.asarray(solved["brute_tree"]["Dense_0"]["bias"])
  np.testing.assert_allclose(f.a, xbar.T @ xbar / len(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(f.g, s.T @ s / len(x), rtol=1e-5, atol=1e-8)

  one = solve("mlp", 1)[-1]
  for n, f1 in one["factors"].items():
    g = vec(one["brute"][n][0])
    np.testing.assert_allclose(np.kron(f1.g, f1.a), np.outer(g, g), rtol=1e-4, atol=1e-7)


def test_location_approximation_is_g_kron_a():
  """With locations, G ⊗ A approximates E_i[vec ∇D_i vec ∇D_iᵀ] when inputs and output gradients
  are independent and locations uncorrelated (Grosse & Martens): a token-wise Dense layer with
  i.i.d. inputs and a probe loss with i.i.d. zero-mean u, Monte Carlo over many examples. The
  factor T of the convention matters: without it the error would be 1 − 1/T = 75%."""
  b, t = 8000, 4
  dense = Dense(2)
  x = normal(0, (b, t, 3)) + 0.5
  u = normal(1, (b, t, 2)) * jnp.array([1.0, 2.0])
  params = {"kernel": normal(3, (3, 2)), "bias": normal(4, (2,))}
  perts = zero_perturbations(dense, {"params": params}, x)

  def per_example_loss(p, q):
    y, state = dense.apply({"params": p, "perturbations": q}, x, mutable=["kfac"])
    return jnp.sum(u * y, axis=(1, 2)), state["kfac"]

  @jax.jit
  def run(p, q):
    caps = kfac.loss_grad_and_captures(per_example_loss, p, q).captures
    return kfac.per_example_layer_grads(caps)[""], kfac.batch_factors(caps)[""]

  grads, f = run(params, perts)
  grads = np.asarray(grads, np.float64)
  vecs = grads.transpose(0, 2, 1).reshape(b, -1)          # column-major vec per example
  exact = vecs.T @ vecs / b
  approx = np.kron(f.g, f.a)
  assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) < 0.05


def test_traces_and_effective_rank(solved):
  factors, ranks = solved["factors"], solved["ranks"]
  for n, tr in solved["traces"].items():
    g = np.asarray(solved["brute"][n], np.float64)
    second = np.mean(np.sum(g**2, (1, 2)))
    centred = np.mean(np.sum((g - g.mean(0))**2, (1, 2)))
    np.testing.assert_allclose(tr.uncentred, second, rtol=1e-4)
    np.testing.assert_allclose(tr.centred, centred, rtol=1e-3, atol=1e-7)
    dense = np.kron(np.asarray(factors[n].g, np.float64), np.asarray(factors[n].a, np.float64))
    np.testing.assert_allclose(tr.kfac_uncentred, np.trace(dense), rtol=1e-4)
    np.testing.assert_allclose(tr.kfac_centred, np.trace(dense) - np.sum(g.mean(0)**2),
                               rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(ranks[n], np.trace(dense)**2 / np.sum(dense**2), rtol=1e-4)
    centred_dense = dense - np.outer(vec(g.mean(0)), vec(g.mean(0)))
    want = np.trace(centred_dense)**2 / np.sum(centred_dense**2)
    np.testing.assert_allclose(solved["ranks_centred"][n], want, rtol=1e-3)
    assert abs(want - ranks[n]) > 1e-3 * want   # centring changes it: the test can tell


# -------------------------------------------------------------------- inverse and sampling


def spd(seed, n, scale=1.0):
  m = np.random.default_rng(seed).normal(size=(n, 2 * n))
  return jnp.asarray(scale * (m @ m.T) / (2 * n), jnp.float32)


def test_damped_inverse_matches_a_dense_solve():
  a, g = spd(0, 5), spd(1, 3, 4.0)
  d = normal(2, (5, 3))
  lam = 0.05
  got = jax.jit(lambda a, g, d: kfac.apply_inverse(kfac.eigen({"l": kfac.Factors(a, g)}),
                                                   {"l": d}, lam)["l"])(a, g, d)
  dense = np.kron(np.asarray(g, np.float64), np.asarray(a, np.float64)) + lam * np.eye(15)
  np.testing.assert_allclose(vec(got), np.linalg.solve(dense, vec(d)), rtol=1e-4, atol=1e-5)


def test_factored_inverse_matches_a_dense_solve_of_the_damped_factors():
  """inverse='factored': (A + γ_A I)⁻¹ D (G + γ_G I)⁻¹ against a dense solve of
  (G + γ_G I) ⊗ (A + γ_A I), γ's from π computed here by hand; and it is not the exact form."""
  a, g = spd(0, 5), spd(1, 3, 0.01)   # unequal scales: π far from 1
  d = normal(2, (5, 3))
  lam = 0.05
  inv = jax.jit(lambda a, g: kfac.refresh_inverse({"l": kfac.Factors(a, g)}, lam,
                                                  "factored"))(a, g)
  got = jax.jit(lambda i, d: kfac.apply_inverse(i, {"l": d}, lam)["l"])(inv, d)
  a64, g64 = np.asarray(a, np.float64), np.asarray(g, np.float64)
  pi = np.sqrt((np.trace(a64) / 5) / (np.trace(g64) / 3))
  assert pi > 3
  gamma_a, gamma_g = pi * np.sqrt(lam), np.sqrt(lam) / pi
  dense = np.kron(g64 + gamma_g * np.eye(3), a64 + gamma_a * np.eye(5))
  np.testing.assert_allclose(vec(got), np.linalg.solve(dense, vec(d)), rtol=1e-4, atol=1e-5)
  exact = np.linalg.solve(np.kron(g64, a64) + lam * np.eye(15), vec(d))
  assert np.linalg.norm(vec(got) - exact) > 0.1 * np.linalg.norm(exact)
  np.testing.assert_allclose(inv["l"].la, np.linalg.eigvalsh(a64), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(inv["l"].lg, np.linalg.eigvalsh(g64), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("form", kfac.INVERSES)
def test_precondition_on_a_parameter_tree(form):
  """Kernel and bias rows go to the right places; uncovered parameters get 0 or themselves."""
  params = {"Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
            "LayerNorm_0": {"scale": jnp.ones(3)}}
  tree = jax.tree.map(lambda p: normal(p.size, p.shape), params)
  a, g = spd(0, 3), spd(1, 3)
  eig = kfac.refresh_inverse({"Dense_0": kfac.Factors(a, g)}, 0.1, form)
  if form == "factored":
    pi = np.sqrt(np.trace(a) / np.trace(g))
    dense = np.kron(g + np.sqrt(0.1) / pi * np.eye(3), a + pi * np.sqrt(0.1) * np.eye(3))
  else:
    dense = np.kron(g, a) + 0.1 * np.eye(9)
  want = np.linalg.solve(dense,
                         vec(np.concatenate([tree["Dense_0"]["kernel"],
                                             tree["Dense_0"]["bias"][None]])))
  want = want.reshape(3, 3).T
  for unfactored, other in (("zero", 0 * tree["LayerNorm_0"]["scale"]),
                            ("identity", tree["LayerNorm_0"]["scale"])):
    v = jax.jit(lambda t, e: kfac.precondition(t, e, 0.1, unfactored))(tree, eig)
    np.testing.assert_allclose(v["Dense_0"]["kernel"], want[:2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v["Dense_0"]["bias"], want[2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(v["LayerNorm_0"]["scale"], other)
  assert kfac.covered(params, ["Dense_0"]) == {
      "Dense_0": {"kernel": True, "bias": True}, "LayerNorm_0": {"scale": False}}


def test_sampling_covariance_is_g_kron_a():
  a, g = spd(0, 3), spd(1, 2, 3.0)
  eig = kfac.eigen({"l": kfac.Factors(a, g)})
  keys = jax.random.split(jax.random.key(5), 40000)
  samples = jax.jit(jax.vmap(lambda k: kfac.sample(eig, k)["l"]))(keys)
  vecs = np.asarray(samples, np.float64).transpose(0, 2, 1).reshape(len(keys), -1)
  dense = np.kron(np.asarray(g, np.float64), np.asarray(a, np.float64))
  np.testing.assert_allclose(vecs.T @ vecs / len(keys), dense, atol=0.03 * np.abs(dense).max())
  assert np.abs(vecs.mean(0)).max() < 0.03 * np.sqrt(np.abs(dense).max())


# ---------------------------------------------------------------------------- EMA schedule


@pytest.mark.parametrize("init", kfac.INITS)
def test_update_state_schedule_and_conditional_factors(init):
  """EMA on steps 0, 2, eigen on steps 0, 3; the running factors start at the identity (the
  first statistics step blends 0.9·I + 0.1·X) or take the first batch factors as they are;
  loss_grad_and_factors with due=False returns zero factors and the same loss and gradient."""
  model, x, y, solved = solve("mlp")
  params, perts, batch = solved["params"], solved["perturbations"], solved["factors"]
  per_example_loss = per_example_loss_of(model)

  run = jax.jit(lambda p, due: kfac.loss_grad_and_factors(per_example_loss, p, perts, x, y,
                                                          due=due))
  on, off = run(params, True), run(params, False)
  for o in (on, off):
    np.testing.assert_allclose(o.loss, solved["out"].loss, rtol=1e-6)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
                 o.grads, solved["out"].grads)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
               on.factors, batch)
  assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(off.factors))
  assert run._cache_size() == 1

  names = kfac.layer_names(perts)
  state = kfac.init_state(params, names, init=init)
  step = jax.jit(lambda s, b: kfac.update_state(s, b, kfac.Schedule(2, 3, 0.9),
                                                init=init))
  scaled = [jax.tree.map(lambda f, c=c: c * f, batch) for c in (1.0, 2.0, 3.0, 5.0)]
  want = None if init == "batch" else jax.tree.map(lambda f: np.eye(f.shape[0]), batch)
  eig_from = None
  for i, b in enumerate(scaled):
    due = bool(state.stats_due)
    assert due == (i % 2 == 0)
    state = step(state, b)
    if i % 2 == 0:
      want = b if want is None else jax.tree.map(lambda w, n: 0.9 * w + 0.1 * n, want, b)
    if i % 3 == 0:
      eig_from = want
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
                 state.factors, want)
    for n, e in state.inverse.items():
      recon = (e.qa * e.la) @ e.qa.T
      np.testing.assert_allclose(recon, eig_from[n].a, rtol=1e-3, atol=1e-4)
  assert step._cache_size() == 1
  assert kfac.stats_due((optax.EmptyState(), {"inner": state})) is state.stats_due


@pytest.mark.parametrize("inverse_every,form", [(2, "exact"), (4, "exact"), (3, "factored")])
def test_update_state_with_a_static_schedule_equals_the_traced_one(inverse_every, form):
  """``due`` given as a Python bool (the trainer knows the schedule) gives the state the traced
  schedule gives, step by step: inverse periods equal to, a multiple of, and not a multiple of
  the statistics period (the last keeps a traced choice for the inverse)."""
  model, x, y, solved = solve("mlp")
  params, batch = solved["params"], solved["factors"]
  names = kfac.layer_names(solved["perturbations"])
  schedule = kfac.Schedule(2, inverse_every, 0.9)
  settings = dict(inverse=form, damping=0.01)
  traced = jax.jit(lambda s, b: kfac.update_state(s, b, schedule, **settings))
  static = jax.jit(lambda s, b, due: kfac.update_state(s, b, schedule, due=due, **settings),
                   static_argnums=2)
  a = b = kfac.init_state(params, names, inverse=form)
  for i in range(7):
    scaled = jax.tree.map(lambda f, c=1.0 + i: c * f, batch)
    due = bool(b.stats_due)
    assert due == (i % 2 == 0)
    a, b = traced(a, scaled), static(b, scaled, due)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7),
                 (b.step, b.factors, b.stats_due), (a.step, a.factors, a.stats_due))
    for n in names:   # eigenvalues, and eigenvectors up to sign (the inverses themselves)
      ea, eb = a.inverse[n], b.inverse[n]
      for u, v in ((ea.la, eb.la), (ea.lg, eb.lg)):
        np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-6)
      for u, v in zip(ea[::2] if form == "exact" else ea[:2], eb[::2] if form == "exact"
                      else eb[:2]):
        np.testing.assert_allclose(np.abs(v), np.abs(u), rtol=1e-4, atol=1e-5)
  assert static._cache_size() == 2


def test_schedule_answers_alike_for_the_loop_and_inside_the_step():
  """``Schedule.stats_due``/``inverse_due`` on a Python int (the trainer's loop) and on a traced
  one (``update_state`` inside the step) agree; its settings are checked where it is made."""
  schedule = kfac.Schedule(3, 6, 0.9)
  assert [schedule.stats_due(i) for i in range(8)] == [i % 3 == 0 for i in range(8)]
  assert [schedule.inverse_due(i) for i in range(8)] == [i % 6 == 0 for i in range(8)]
  traced = jax.jit(lambda i: (schedule.stats_due(i), schedule.inverse_due(i)))
  for i in range(8):
    assert tuple(bool(x) for x in traced(i)) == (schedule.stats_due(i), schedule.inverse_due(i))
  assert schedule.inverse_only_with_stats and not kfac.Schedule(2, 3).inverse_only_with_stats
  for bad, match in (((0, 50), "stats_every must be an integer >= 1, got 0"),
                     ((50, 2.5), "inverse_every must be an integer >= 1, got 2.5"),
                     ((50, 50, 1.0), r"ema_decay must be a number in \[0, 1\), got 1.0"),
                     ((50, 50, "0.9"), r"ema_decay must be a number in \[0, 1\), got '0.9'"),
                     ((50, 50, None), r"ema_decay must be a number in \[0, 1\), got None")):
    with pytest.raises(ValueError, match=match):
      kfac.Schedule(*bad)
  assert kfac.Schedule(np.int64(5)) == kfac.Schedule(5)   # numpy integers are integers
  assert type(kfac.Schedule(np.int64(5)).stats_every) is int
