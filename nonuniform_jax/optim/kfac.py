"""Kronecker-factored second moment of per-example gradients (K-FAC factors), from one pass.

Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature"
(ICML 2015); Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution
layers" (ICML 2016); used by the paper's CSAM ("Kronecker-factored approximate variance").

Captures (made by ``nonuniform_jax.models.layers`` under the names of
``nonuniform_jax.capture``): for a layer with stacked parameters
D = [kernel.reshape(K, F); bias] ∈ R^{K̄×F}, example i and location t (conv output position or
token; T = 1 for a plain Dense layer), x̄_{i,t} ∈ R^{K̄} is the input (patch) with a trailing 1
when the layer has a bias and s_{i,t} = ∂ℓ_i/∂y_{i,t} ∈ R^F. Exactly::

    ∇D_i  = Σ_t x̄_{i,t} s_{i,t}ᵀ                         per-example gradient of ℓ_i
    ‖∇D_i‖² = Σ_{t,t'} (x̄_{i,t}·x̄_{i,t'}) (s_{i,t}·s_{i,t'})    (= ‖x̄_i‖²‖s_i‖² when T = 1)

Factors, with B examples (normalisation of Grosse & Martens: A sums over locations, G averages)::

    A = (1/B) Σ_i Σ_t x̄_{i,t} x̄_{i,t}ᵀ,     G = (1/(B·T)) Σ_i Σ_t s_{i,t} s_{i,t}ᵀ
    F_layer = E_i[vec(∇D_i) vec(∇D_i)ᵀ] ≈ G ⊗ A       (column-major vec, i.e. vec(D) = Dᵀ.ravel())

The approximation is K-FAC's E[ssᵀ ⊗ x̄x̄ᵀ] ≈ E[ssᵀ] ⊗ E[x̄x̄ᵀ] (exact for a single example
with T = 1; for B > 1 examples G ⊗ A = (1/B²) Σ_{i,j} s_i s_iᵀ ⊗ x̄_j x̄_jᵀ, not the second
moment) and, with T > 1, uncorrelated locations (Grosse & Martens' IAD/SUD; for ViT tokens the
"expand" setting of Eschenhagen et al., NeurIPS 2023: tokens as extra examples, where any split of
the scalar T between A and G gives the same G ⊗ A). Under those assumptions
G ⊗ A = T · E_{i,t}[ssᵀ] ⊗ E_{i,t}[x̄x̄ᵀ]. Exact per-example quantities (norms, traces) are
computed from the captures directly, never from the factors.

Layers are named by their module path joined with '/', e.g. ``'Dense_0'`` or
``'Block_1/Conv_0'``; parameter trees are Flax nested dicts.
"""

import dataclasses
import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax import lax

from nonuniform_jax.capture import INPUTS, NORM_OUTPUTS, NORMALIZED, OUTPUTS
from nonuniform_jax.pytree import layer_params

HIGHEST = lax.Precision.HIGHEST


class LayerCapture(NamedTuple):
  """What one pass captures for one layer: inputs x̄ [B, T, K̄] and output grads s [B, T, F]."""
  inputs: jax.Array
  out_grads: jax.Array


class NormCapture(NamedTuple):
  """What one pass captures for a BatchNorm layer in running mode (``layers.BatchNorm``): the
  normalised inputs x̂ [B, T, C] and output grads s [B, T, C]. No Kronecker factors."""
  normalized: jax.Array
  out_grads: jax.Array


class Factors(NamedTuple):
  """Kronecker factors of one layer: a = A [K̄, K̄], g = G [F, F]."""
  a: jax.Array
  g: jax.Array


class Eigen(NamedTuple):
  """Eigendecompositions A = qa diag(la) qaᵀ, G = qg diag(lg) qgᵀ (eigenvalues clipped at 0):
  the ``inverse='exact'`` form of a layer's damped inverse (``apply_inverse``)."""
  qa: jax.Array
  la: jax.Array
  qg: jax.Array
  lg: jax.Array


class FactoredInverse(NamedTuple):
  """The ``inverse='factored'`` form of a layer's damped inverse: a_inv = (A + γ_A I)⁻¹,
  g_inv = (G + γ_G I)⁻¹ (``factored_inverse``), and the eigenvalues la, lg of A and G (clipped
  at 0) they were computed from."""
  a_inv: jax.Array
  g_inv: jax.Array
  la: jax.Array
  lg: jax.Array


class Captured(NamedTuple):
  """Result of ``loss_grad_and_captures``: mean loss, its gradient, ``{layer: LayerCapture}``,
  the loss function's aux (None without ``has_aux``) and ``{layer: NormCapture}`` of the
  BatchNorm layers captured in running mode (empty for models without them)."""
  loss: jax.Array
  grads: Any
  captures: dict
  aux: Any
  norm_captures: dict


class Factored(NamedTuple):
  """Result of ``loss_grad_and_factors``: mean loss, its gradient, ``{layer: Factors}`` of the
  batch (zeros when not due) and aux."""
  loss: jax.Array
  grads: Any
  factors: dict
  aux: Any


class KFACState(NamedTuple):
  """Running Kronecker factors (EMA) and their damped inverse.

  step: number of ``update_state`` calls so far (int32).
  factors: ``{layer: Factors}``, the exponential moving average.
  inverse: ``{layer: Eigen}`` (``inverse='exact'``) or ``{layer: FactoredInverse}``
    (``'factored'``) of ``factors`` at the last inverse refresh (``refresh_inverse``).
  stats_due: whether the next ``update_state`` refreshes the statistics (so the caller knows
    whether to capture in the clean pass: see ``stats_due`` and ``loss_grad_and_factors``).
  """
  step: jax.Array
  factors: dict
  inverse: dict
  stats_due: jax.Array


# ----------------------------------------------------------------------------- capture


def _key(name: str, leaf: str) -> str:
  """'/'-joined path of a variable of layer ``name`` ('' is a model that is itself the layer)."""
  return f"{name}/{leaf}" if name else leaf


def _layer_of(key: str, leaf: str) -> str | None:
  if key == leaf:
    return ""
  return key[:-len(leaf) - 1] if key.endswith("/" + leaf) else None


def layer_names(perturbations) -> list[str]:
  """The captured layers of a model, from its ``'perturbations'`` collection."""
  flat = traverse_util.flatten_dict(perturbations, sep="/")
  return sorted(n for n in (_layer_of(k, OUTPUTS) for k in flat) if n is not None)


def norm_layer_names(perturbations) -> list[str]:
  """The captured BatchNorm layers (running mode) of a model, from its ``'perturbations'``."""
  flat = traverse_util.flatten_dict(perturbations, sep="/")
  return sorted(n for n in (_layer_of(k, NORM_OUTPUTS) for k in flat) if n is not None)


def _paired(kfac_collection, perturbation_grads, names, sown: str, output: str) -> dict:
  """``{layer: (sown capture, output grads [B, T, F])}`` for ``names``."""
  inputs = traverse_util.flatten_dict(kfac_collection, sep="/")
  outputs = traverse_util.flatten_dict(perturbation_grads, sep="/")
  missing = sorted(set(names) ^ {n for n in (_layer_of(k, sown) for k in inputs)
                                 if n is not None})
  if missing:
    raise ValueError(f"layers {missing} have a perturbation but no sown {sown} or vice versa: "
                     "apply the model with the perturbations and mutable=['kfac']")
  pairs = {}
  for name in names:
    s = outputs[_key(name, output)]
    pairs[name] = (inputs[_key(name, sown)], s.reshape(s.shape[0], -1, s.shape[-1]))
  return pairs


def _captures(kfac_collection, perturbation_grads) -> dict:
  return {name: LayerCapture(*pair) for name, pair in _paired(
      kfac_collection, perturbation_grads, layer_names(perturbation_grads), INPUTS,
      OUTPUTS).items()}


def _norm_captures(kfac_collection, perturbation_grads) -> dict:
  return {name: NormCapture(*pair) for name, pair in _paired(
      kfac_collection, perturbation_grads, norm_layer_names(perturbation_grads), NORMALIZED,
      NORM_OUTPUTS).items()}


def loss_grad_and_captures(per_example_loss_fn: Callable, params, perturbations, *args,
                           has_aux: bool = False) -> Captured:
  """Mean loss, its parameter gradient and the per-layer captures, in ONE forward+backward.

  ``per_example_loss_fn(params, perturbations, *args)`` returns ``(losses, kfac)`` (or
  ``(losses, kfac, aux)`` with ``has_aux``) where ``losses`` [B] are the per-example losses ℓ_i
  and ``kfac`` is the ``'kfac'`` collection of a model applied with the perturbations in its
  variables and ``mutable=['kfac', ...]``. The gradient of Σ_i ℓ_i with respect to the
  perturbations gives s_i; ``grads`` is the gradient of the mean (1/B) Σ_i ℓ_i.

  With train-mode BatchNorm the examples interact, and s_i is row i of the batch gradient
  (what autograd hooks give), not a per-example gradient; Σ_i ∇D_i is still the batch gradient.

  Example::

    import jax, jax.numpy as jnp, optax
    from nonuniform_jax import models
    from nonuniform_jax.models.layers import zero_perturbations
    from nonuniform_jax.optim import kfac

    model = models.get_model('mlp', 10)
    x, y = jnp.ones((8, 40)), jnp.arange(8) % 10
    params = model.init(jax.random.key(0), x)['params']
    perts = zero_perturbations(model, {'params': params}, x)

    def per_example_loss(params, perts, x, y):
      logits, state = model.apply({'params': params, 'perturbations': perts}, x,
                                  mutable=['kfac'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y), state['kfac']

    out = kfac.loss_grad_and_captures(per_example_loss, params, perts, x, y)
    norms = kfac.per_example_sq_norms(out.captures)   # {'Dense_0': [8], ...}
  """
  def total(p, q):
    out = per_example_loss_fn(p, q, *args)
    losses, kfac_collection, aux = out if has_aux else (*out, None)
    return jnp.sum(losses), (losses, kfac_collection, aux)

  (_, (losses, kfac_collection, aux)), (grads, pert_grads) = jax.value_and_grad(
      total, argnums=(0, 1), has_aux=True)(params, perturbations)
  b = losses.shape[0]
  grads = jax.tree.map(lambda g: g / b, grads)
  return Captured(jnp.mean(losses), grads, _captures(kfac_collection, pert_grads), aux,
                  _norm_captures(kfac_collection, pert_grads))


def loss_grad_and_factors(per_example_loss_fn: Callable, params, perturbations, *args,
                          due, has_aux: bool = False) -> Factored:
  """Like ``loss_grad_and_captures`` but returns the batch ``Factors`` instead of the raw
  captures, and only computes them when ``due`` (a bool or a traced bool, e.g.
  ``stats_due(opt_state)``): otherwise (``lax.cond``) it is a plain forward+backward (the sown
  patches and output gradients are dead code) and the factors are zeros. This is the cheap way
  to feed CSAM/GAM with ``metric='kfac'``: statistics cost nothing on steps that do not refresh.
  Under ``vmap`` a traced ``due`` becomes a select and both branches run.
  """
  def captured(p):
    out = loss_grad_and_captures(per_example_loss_fn, p, perturbations, *args, has_aux=has_aux)
    return Factored(out.loss, out.grads, batch_factors(out.captures), out.aux)

  def plain(p):
    zeros = jax.tree.map(jnp.zeros_like, perturbations)
    def mean_loss(p):
      out = per_example_loss_fn(p, zeros, *args)
      return jnp.mean(out[0]), out[2] if has_aux else None
    (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(p)
    shapes = jax.eval_shape(captured, p).factors
    return Factored(loss, grads, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                    aux)

  if isinstance(due, bool):
    return captured(params) if due else plain(params)
  return lax.cond(due, captured, plain, params)


# ------------------------------------------------------------- exact per-example quantities


def per_example_layer_grads(captures) -> dict:
  """``{layer: [B, K̄, F]}``: ∇D_i = Σ_t x̄_{i,t} s_{i,t}ᵀ (rows: kernel.reshape(K, F), then
  the bias)."""
  return {name: jnp.einsum("btk,btf->bkf", _f32(c.inputs), _f32(c.out_grads), precision=HIGHEST)
          for name, c in captures.items()}


def _f32(x: jax.Array) -> jax.Array:
  """Captures of a bfloat16 model in float32: the factors, their inverses and every product
  with them are float32 whatever the model's precision."""
  return x.astype(jnp.float32)


def per_example_sq_norms(captures) -> dict:
  """``{layer: [B]}``: exact ‖∇D_i‖² of each layer's parameters (kernel and bias) per example.

  T = 1: ‖x̄_i‖²‖s_i‖². T > 1: the Gram form Σ_{t,t'} (x̄_t·x̄_t')(s_t·s_t') when cheaper
  (T·(K̄+F) ≤ K̄·F), else ‖Σ_t x̄_t s_tᵀ‖²_F; both are exact.
  """
  norms = {}
  for name, c in captures.items():
    _, t, k = c.inputs.shape
    f = c.out_grads.shape[-1]
    if t * (k + f) <= k * f:
      xx = jnp.einsum("btk,buk->btu", c.inputs, c.inputs, precision=HIGHEST)
      ss = jnp.einsum("btf,buf->btu", c.out_grads, c.out_grads, precision=HIGHEST)
      norms[name] = jnp.sum(xx * ss, axis=(1, 2))
    else:
      norms[name] = jnp.sum(per_example_layer_grads({name: c})[name] ** 2, axis=(1, 2))
  return norms


def norm_per_example_sq_norms(norm_captures) -> dict:
  """``{layer: [B]}``: exact ‖∇γ_i‖² + ‖∇β_i‖² of each captured BatchNorm layer per example,
  ∇γ_i = Σ_t x̂_{i,t} ⊙ s_{i,t} and ∇β_i = Σ_t s_{i,t} (``layers.BatchNorm``)."""
  out = {}
  for name, c in norm_captures.items():
    scale = jnp.sum(c.normalized * c.out_grads, axis=1)
    offset = jnp.sum(c.out_grads, axis=1)
    out[name] = jnp.sum(scale ** 2, axis=-1) + jnp.sum(offset ** 2, axis=-1)
  return out


def mean_grads(captures) -> dict:
  """``{layer: [K̄, F]}``: the mean-loss gradient (1/B) Σ_i ∇D_i."""
  return {name: jnp.einsum("btk,btf->kf", c.inputs, c.out_grads, precision=HIGHEST)
          / c.inputs.shape[0] for name, c in captures.items()}


class Traces(NamedTuple):
  """Per-layer traces of the per-example gradient second moment and covariance over the B
  examples of the captures (means with 1/B, no Bessel correction).

  kfac_uncentred: tr(G ⊗ A) = tr A · tr G of the batch factors (the K-FAC approximation).
  kfac_centred: tr(G ⊗ A) − ‖∇D̄‖².
  uncentred: exact E_i ‖∇D_i‖².
  centred: exact tr Σ_layer = E_i ‖∇D_i‖² − ‖∇D̄‖², ∇D̄ = E_i ∇D_i.
  """
  kfac_uncentred: jax.Array
  kfac_centred: jax.Array
  uncentred: jax.Array
  centred: jax.Array


def traces(captures) -> dict:
  """``{layer: Traces}`` over the B examples of the captures (see ``Traces``)."""
  norms, means, factors = per_example_sq_norms(captures), mean_grads(captures), batch_factors(
      captures)
  out = {}
  for name in captures:
    kfac_trace = jnp.trace(factors[name].a) * jnp.trace(factors[name].g)
    mean_sq = jnp.sum(means[name] ** 2)
    second = jnp.mean(norms[name])
    out[name] = Traces(kfac_trace, kfac_trace - mean_sq, second, second - mean_sq)
  return out


# ---------------------------------------------------------------------------- factors


def batch_factors(captures) -> dict:
  """``{layer: Factors}`` of a batch: A = (1/B) Σ_{i,t} x̄x̄ᵀ, G = (1/(B·T)) Σ_{i,t} ssᵀ."""
  out = {}
  for name, c in captures.items():
    b, t, _ = c.inputs.shape
    x, s = _f32(c.inputs), _f32(c.out_grads)
    out[name] = Factors(jnp.einsum("btk,btl->kl", x, x, precision=HIGHEST) / b,
                        jnp.einsum("btf,btg->fg", s, s, precision=HIGHEST) / (b * t))
  return out


def effective_rank(factors) -> dict:
  """``{layer: scalar}``: tr(G⊗A)² / ‖G⊗A‖_F² = [(tr A)²/‖A‖_F²]·[(tr G)²/‖G‖_F²]."""
  def rank(m):
    return jnp.trace(m) ** 2 / jnp.sum(m ** 2)
  return {name: rank(f.a) * rank(f.g) for name, f in factors.items()}


def effective_rank_centred(factors, mean_grads) -> dict:
  """``{layer: scalar}``: tr(Σ̂)² / ‖Σ̂‖_F² of the centred Kronecker-factored covariance
  Σ̂ = G⊗A − vec(D̄)vec(D̄)ᵀ, D̄ the layer's mean gradient [K̄, F] (``mean_grads``), in closed
  form from the factors (no [K̄F, K̄F] matrix)::

      tr Σ̂ = tr A · tr G − ‖D̄‖²
      ‖Σ̂‖_F² = ‖A‖_F² ‖G‖_F² − 2 ⟨D̄, A D̄ G⟩ + ‖D̄‖⁴      (vec(D̄)ᵀ(G⊗A)vec(D̄) = ⟨D̄, A D̄ G⟩)
  """
  out = {}
  for name, f in factors.items():
    d = mean_grads[name]
    sq = jnp.sum(d ** 2)
    trace = jnp.trace(f.a) * jnp.trace(f.g) - sq
    quad = jnp.sum(d * jnp.linalg.multi_dot([f.a, d, f.g], precision=HIGHEST))
    fro = jnp.sum(f.a ** 2) * jnp.sum(f.g ** 2) - 2.0 * quad + sq ** 2
    out[name] = trace ** 2 / fro
  return out


INVERSES = ("exact", "factored")


def eigen(factors) -> dict:
  """``{layer: Eigen}`` of ``{layer: Factors}`` (symmetric eigendecomposition, λ ≥ 0).

  One ``eigh`` call per factor, which XLA runs concurrently: on a 2-core CPU that is faster
  than one batched call per size (``benchmarks/bench_csam.py``), and jaxlib's CPU kernel can
  deadlock when two batched ``eigh`` calls run at once (both pool threads wait for work queued
  behind them; jax 0.10.2).
  """
  def decompose(m):
    lam, q = jnp.linalg.eigh(m)
    return q, jnp.maximum(lam, 0.0)
  return {name: Eigen(*decompose(f.a), *decompose(f.g)) for name, f in factors.items()}


def pi_correction(a: jax.Array, g: jax.Array) -> jax.Array:
  """π = sqrt((tr A / dim A) / (tr G / dim G)) (Martens & Grosse 2015, §6.3), the split of the
  damping between the factors that minimises the norm of the factored damping's extra terms;
  1 when either trace is 0."""
  ta, tg = jnp.trace(a) / a.shape[0], jnp.trace(g) / g.shape[0]
  ok = (ta > 0) & (tg > 0)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1.0), 1.0)), 1.0)


def factored_inverse(factors, damping: float) -> dict:
  """``{layer: FactoredInverse}``: the factored Tikhonov damping of Martens & Grosse (2015,
  §6.3), (G ⊗ A + λI)⁻¹ ≈ (G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹ with γ_A = π√λ, γ_G = √λ/π
  (``pi_correction``; γ_A·γ_G = λ). The product of the damped factors is
  G ⊗ A + λI + γ_G (I ⊗ A) + γ_A (G ⊗ I): more damping than λI, along the factors' own scales.
  Computed from the eigendecompositions of ``eigen`` (so the eigenvalues, which the step
  diagnostics report, come for free)."""
  dec = eigen(factors)
  out = {}
  for name, f in factors.items():
    e = dec[name]
    pi = pi_correction(f.a, f.g)
    gamma_a, gamma_g = pi * math.sqrt(damping), math.sqrt(damping) / pi

    def inv(q, lam, gamma):
      return jnp.matmul(q / (lam + gamma)[None, :], q.T, precision=HIGHEST)

    out[name] = FactoredInverse(inv(e.qa, e.la, gamma_a), inv(e.qg, e.lg, gamma_g), e.la, e.lg)
  return out


def refresh_inverse(factors, damping: float, inverse: str = "exact") -> dict:
  """The damped inverse of ``factors`` in the form ``inverse`` ('exact': ``eigen``;
  'factored': ``factored_inverse``)."""
  if inverse not in INVERSES:
    raise ValueError(f"inverse must be one of {INVERSES}, got {inverse!r}")
  return eigen(factors) if inverse == "exact" else factored_inverse(factors, damping)


def apply_inverse(inverses, mats, damping: float) -> dict:
  """``{layer: [K̄, F]}``: the damped inverse applied to each layer matrix D, as a matrix.

  ``{layer: Eigen}`` (exact): (G ⊗ A + λI)⁻¹ vec(D), four products::

      Q_A [ (Q_Aᵀ D Q_G) ⊘ (λ_A λ_Gᵀ + λ) ] Q_Gᵀ

  ``{layer: FactoredInverse}``: ((G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹) vec(D), two products
  (A + γ_A I)⁻¹ D (G + γ_G I)⁻¹ (``damping`` was used when the inverse was computed).
  """
  out = {}
  for name, d in mats.items():
    e = inverses[name]
    if isinstance(e, FactoredInverse):
      out[name] = jnp.linalg.multi_dot([e.a_inv, d, e.g_inv], precision=HIGHEST)
      continue
    rotated = jnp.linalg.multi_dot([e.qa.T, d, e.qg], precision=HIGHEST)
    scaled = rotated / (e.la[:, None] * e.lg[None, :] + damping)
    out[name] = jnp.linalg.multi_dot([e.qa, scaled, e.qg.T], precision=HIGHEST)
  return out


def sample(eigens, key) -> dict:
  """``{layer: [K̄, F]}`` with vec(X) ~ N(0, G ⊗ A): X = Q_A Λ_A^{1/2} Z Λ_G^{1/2} Q_Gᵀ, Z standard
  normal (any square roots give the same law as A^{1/2} Z G^{1/2})."""
  keys = jax.random.split(key, len(eigens))
  out = {}
  for k, (name, e) in zip(keys, sorted(eigens.items())):
    z = jax.random.normal(k, (e.la.shape[0], e.lg.shape[0]), e.la.dtype)
    scaled = jnp.sqrt(e.la)[:, None] * z * jnp.sqrt(e.lg)[None, :]
    out[name] = jnp.linalg.multi_dot([e.qa, scaled, e.qg.T], precision=HIGHEST)
  return out


# ------------------------------------------------------------------ parameter pytrees


def to_layer_matrices(tree, layers) -> dict:
  """``{layer: [K̄, F]}``: each layer's [kernel.reshape(K, F); bias] from a tree shaped like the
  parameters."""
  out = {}
  for name in layers:
    sub = layer_params(tree, name)
    kernel = sub["kernel"]
    mat = kernel.reshape(-1, kernel.shape[-1])
    out[name] = jnp.concatenate([mat, sub["bias"][None]], 0) if "bias" in sub else mat
  return out


def from_layer_matrices(mats, fill):
  """A tree like ``fill`` with each layer's kernel (and bias) replaced from ``mats``."""
  flat = traverse_util.flatten_dict(fill, sep="/")
  for name, mat in mats.items():
    kernel = flat[_key(name, "kernel")]
    k = math.prod(kernel.shape[:-1])
    flat[_key(name, "kernel")] = mat[:k].reshape(kernel.shape)
    if _key(name, "bias") in flat:
      flat[_key(name, "bias")] = mat[k]
  return traverse_util.unflatten_dict(flat, sep="/")


def covered(params, layers):
  """A tree like ``params`` of Python bools: True on the kernels and biases of ``layers`` (the
  parameters the captures and factors describe); the caller falls back on the others."""
  flat = traverse_util.flatten_dict(params, sep="/")
  names = set()
  for name in layers:
    layer_params(params, name)
    names.update(k for k in (_key(name, "kernel"), _key(name, "bias")) if k in flat)
  return traverse_util.unflatten_dict({k: k in names for k in flat}, sep="/")


def layer_dims(params, layers) -> dict:
  """``{layer: (K̄, F)}`` from the parameter shapes."""
  out = {}
  for name in layers:
    sub = layer_params(params, name)
    kernel = sub["kernel"]
    out[name] = (math.prod(kernel.shape[:-1]) + ("bias" in sub), kernel.shape[-1])
  return out


UNFACTORED = ("zero", "identity")


def precondition(tree, inverses, damping: float, unfactored: str = "zero"):
  """v = (F + λI)⁻¹ tree on the factored layers (``apply_inverse``, exact or factored by the
  form of ``inverses``); on the other parameters v = 0 (``unfactored='zero'``) or v = tree
  (``'identity'``: the metric there is I)."""
  if unfactored not in UNFACTORED:
    raise ValueError(f"unfactored must be one of {UNFACTORED}, got {unfactored!r}")
  mats = apply_inverse(inverses, to_layer_matrices(tree, inverses), damping)
  fill = tree if unfactored == "identity" else jax.tree.map(jnp.zeros_like, tree)
  return from_layer_matrices(mats, fill)


# -------------------------------------------------------------------------- EMA state


INITS = ("identity", "batch")


def init_state(params, layers, *, init: str = "identity", inverse: str = "exact") -> KFACState:
  """The running factors of ``layers`` (see ``layer_names``) of ``params`` before any
  statistics: identity matrices (``init='identity'``: the first statistics step blends
  decay·I + (1 − decay)·X, X the batch factor) or zeros (``'batch'``: the first statistics
  step takes the batch factors as they are). The first ``update_state`` (step 0) always
  refreshes both statistics and inverse: the inverse held until then (identity matrices, unit
  eigenvalues, in the form ``inverse``) is never applied."""
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  dims = layer_dims(params, layers)
  dtype = jnp.result_type(*jax.tree.leaves(params))
  make = (lambda n: jnp.eye(n, dtype=dtype)) if init == "identity" else (
      lambda n: jnp.zeros((n, n), dtype))
  factors = {n: Factors(make(k), make(f)) for n, (k, f) in dims.items()}
  eye, ones = (lambda n: jnp.eye(n, dtype=dtype)), (lambda n: jnp.ones(n, dtype))
  if inverse == "exact":
    inverses = {n: Eigen(eye(k), ones(k), eye(f), ones(f)) for n, (k, f) in dims.items()}
  else:
    inverses = {n: FactoredInverse(eye(k), eye(f), ones(k), ones(f))
                for n, (k, f) in dims.items()}
  return KFACState(jnp.zeros((), jnp.int32), factors, inverses, jnp.array(True))


def validate_settings(*, damping: float, unfactored: str, layers, schedule,
                      init: str = "identity", inverse: str = "exact") -> None:
  """Raises ValueError on a bad K-FAC setting (before anything is traced); the schedule's own
  settings are checked by ``Schedule``."""
  if not damping > 0:
    raise ValueError(f"damping must be > 0, got {damping!r}")
  if unfactored not in UNFACTORED:
    raise ValueError(f"unfactored must be one of {UNFACTORED}, got {unfactored!r}")
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  if inverse not in INVERSES:
    raise ValueError(f"inverse must be one of {INVERSES}, got {inverse!r}")
  if not layers or isinstance(layers, str):
    raise ValueError(f"kfac_layers must be a non-empty sequence of layer names (see "
                     f"kfac.layer_names), got {layers!r}")
  if not isinstance(schedule, Schedule):
    raise ValueError(f"schedule must be a kfac.Schedule(stats_every, inverse_every, "
                     f"ema_decay), got {schedule!r}")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the running factors take in a batch's statistics and when their damped inverse is
  recomputed, and how fast the running factors forget: the one description that both the
  optimizer (``update_state``) and a training loop (which steps must capture the statistics:
  ``stats_due``) read.

  Steps are the optimizer's update indices, counted from 0: the statistics refresh on 0,
  ``stats_every``, 2·``stats_every``, …, the inverse on 0, ``inverse_every``, …; a refresh blends
  factors ← ``ema_decay``·factors + (1 − ``ema_decay``)·batch. ``stats_due`` and
  ``inverse_due`` take a Python int (the loop) or a traced one (inside the step).
  """
  stats_every: int = 50
  inverse_every: int = 50
  ema_decay: float = 0.95

  def __post_init__(self):
    for name in ("stats_every", "inverse_every"):
      value = getattr(self, name)
      if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
              and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
      object.__setattr__(self, name, int(value))
    decay = self.ema_decay
    if not (isinstance(decay, numbers.Real) and not isinstance(decay, bool)
            and 0.0 <= decay < 1.0):
      raise ValueError(f"ema_decay must be a number in [0, 1), got {decay!r}")
    object.__setattr__(self, "ema_decay", float(decay))

  def stats_due(self, index):
    """Whether update ``index`` refreshes the statistics (the step must capture them)."""
    return index % self.stats_every == 0

  def inverse_due(self, index):
    """Whether update ``index`` recomputes the damped inverse (after its statistics)."""
    return index % self.inverse_every == 0

  @property
  def inverse_only_with_stats(self) -> bool:
    """Every inverse refresh falls on a statistics refresh (``inverse_every`` is a multiple of
    ``stats_every``): a step without statistics never recomputes the inverse."""
    return self.inverse_every % self.stats_every == 0


def update_state(state: KFACState, batch, schedule: Schedule, *, due: bool | None = None,
                 init: str = "identity", inverse: str = "exact",
                 damping: float = 1e-3) -> KFACState:
  """One step of the factor ``schedule`` (pure; nothing recompiles across steps).

  On a statistics step (``schedule.stats_due(state.step)``): factors ← decay·factors +
  (1 − decay)·batch, where the factors start at the identity (``init='identity'``,
  ``init_state``), or, with ``init='batch'``, factors ← batch at step 0 (no bias towards the zero
  start). ``batch`` is ignored on the other steps (zeros are fine there). Then, on an inverse
  step (``schedule.inverse_due``), the damped inverse is recomputed from the updated factors
  (``refresh_inverse`` in the form ``inverse``; ``damping`` is used only by the factored form,
  which splits it between the factors).

  ``due``: None reads the schedule from ``state.step`` and chooses with ``lax.cond`` (one
  program for every step). A Python bool says whether this step refreshes the statistics (it
  must equal ``schedule.stats_due`` of the step, i.e. ``stats_due(opt_state)`` before the
  update): the statistics branch is then chosen while tracing. The inverse branch is chosen
  while tracing too on a step without statistics when ``schedule.inverse_only_with_stats`` (it
  cannot be due there), and on a step with them when the two periods are equal (it is due
  there); otherwise it stays a ``lax.cond``. With the default equal periods a step that does not
  refresh carries the state through untouched, with no conditional.
  """
  if set(batch) != set(state.factors):
    raise ValueError(f"batch factors for layers {sorted(batch)} do not match the state's "
                     f"layers {sorted(state.factors)}")
  step = state.step
  decay = (jnp.where(step == 0, 0.0, schedule.ema_decay) if init == "batch"
           else schedule.ema_decay)

  def ema(factors):
    return jax.tree.map(lambda old, new: decay * old + (1.0 - decay) * new, factors, batch)

  def new_inverse(factors):
    return refresh_inverse(factors, damping, inverse)

  def keep_inverse(_):
    return state.inverse

  if due is None:
    factors = lax.cond(schedule.stats_due(step), ema, lambda f: f, state.factors)
  else:
    factors = ema(state.factors) if due else state.factors
  if due is not None and schedule.inverse_only_with_stats and not due:
    inverses = state.inverse
  elif due is not None and schedule.inverse_every == schedule.stats_every:
    inverses = new_inverse(factors)
  else:
    inverses = lax.cond(schedule.inverse_due(step), new_inverse, keep_inverse, factors)
  nxt = step + 1
  return KFACState(nxt, factors, inverses, schedule.stats_due(nxt))


def states(opt_state) -> list:
  """Every ``KFACState`` inside ``opt_state`` (anywhere in an ``optax.chain``), in tree order."""
  return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, KFACState))
          if isinstance(s, KFACState)]


def stats_due(opt_state) -> jax.Array:
  """Whether the optimizer holding the one ``KFACState`` inside ``opt_state`` (CSAM or GAM with
  ``metric='kfac'``, anywhere in an ``optax.chain``) refreshes its statistics on its next
  update: pass it as ``due`` to ``loss_grad_and_factors``."""
  found = states(opt_state)
  if len(found) != 1:
    raise ValueError(f"expected one KFACState in the optimizer state, found {len(found)}")
  return found[0].stats_due


def spectrum_diagnostics(state: KFACState) -> dict:
  """Scalars describing the damped inverse in force (see ``nonuniform_jax.optim.diagnostics``):
  per layer ``kfac/<layer>/a_min``, ``a_max``, ``g_min``, ``g_max``, the extreme eigenvalues of
  the running factors A and G at the last inverse refresh, and over all layers ``kfac/f_min``,
  ``kfac/f_max``, the extreme eigenvalues of the block-diagonal F (those of G ⊗ A are the
  products λ_A·λ_G). They change only when the inverse is refreshed."""
  out = {}
  lo, hi = [], []
  for name, inv in state.inverse.items():
    ext = {"a_min": jnp.min(inv.la), "a_max": jnp.max(inv.la), "g_min": jnp.min(inv.lg),
           "g_max": jnp.max(inv.lg)}
    out.update({f"kfac/{_key(name, k)}": v for k, v in ext.items()})
    lo.append(ext["a_min"] * ext["g_min"])
    hi.append(ext["a_max"] * ext["g_max"])
  out["kfac/f_min"] = jnp.min(jnp.stack(lo))
  out["kfac/f_max"] = jnp.max(jnp.stack(hi))
  return out
