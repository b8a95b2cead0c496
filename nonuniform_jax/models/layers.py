"""Dense and Conv layers that can expose what the Kronecker factors need.

They are ``flax.linen.Dense`` and ``flax.linen.Conv`` (same parameters, same names in the
parameter tree) plus two optional captures, both free when not asked for:

* the layer input x̄, sown as ``'kfac'/<layer path>/'inputs'`` when the ``'kfac'`` collection
  is mutable, already in the layout of the per-example gradient (see below);
* the layer output, passed through ``Module.perturb`` under ``'perturbations'/<layer
  path>/'outputs'``, so that the gradient of the SUMMED loss Σ_i ℓ_i with respect to the
  ``'perturbations'`` collection is the per-example output gradient s_i = ∂ℓ_i/∂y_i.

Capture layout (B examples, T locations per example, K̄ = K + 1 with a bias, K without):

* ``Dense`` on x of shape [B, ..., d_in]: x̄ has shape [B, T, K̄], T = the product of the middle
  axes (tokens of a ViT are locations), and the last column is 1 when the layer has a bias.
* ``Conv`` on x of shape [B, ..., *spatial, C]: x̄ holds the input patch of every output location,
  shape [B, T, K̄] with T = the product of the extra batch axes and the output spatial shape and
  K = prod(kernel_size)·C, ordered so that ``x̄[..., :K] @ kernel.reshape(K, features)`` is the
  convolution (kernel position major, input channel minor; note that
  ``lax.conv_general_dilated_patches`` orders channel major instead). Padding ('SAME',
  'SAME_LOWER', 'VALID' or explicit pairs), strides, input and kernel dilation are honoured.

The per-example gradient of the layer's stacked parameters [kernel.reshape(K, F); bias] is then
Σ_t x̄_{i,t} s_{i,t}ᵀ; ``nonuniform_jax.optim.kfac`` turns the captures into gradients, norms and
Kronecker factors.

Rules for callers:

* ``model.init`` creates neither collection (both captures are skipped while initialising), so
  the initial variables hold only ``'params'`` (and ``'batch_stats'``). Build the zero
  perturbations for a batch shape with ``zero_perturbations`` and pass them in the variables of
  ``apply`` together with ``mutable=['kfac', ...]``.
* A layer must be called at most once per ``apply`` when captured: a second call raises a
  ``ValueError`` (its perturbation would receive the sum of both calls' output gradients).
* Every Dense, Conv and BatchNorm layer of every model in ``nonuniform_jax.models`` comes
  from here. BatchNorm (class docstring) is captured for exact per-example gradient norms only:
  it has no Kronecker factors.
"""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding
from jax import lax

# The collections and names of the capture (``nonuniform_jax.capture``, read by K-FAC).
from nonuniform_jax.capture import (INPUTS, KFAC, NORM_OUTPUTS, NORMALIZED, OUTPUTS,
                                    PERTURBATIONS)


def _store_once(previous, value):
  if previous is not None:
    raise ValueError("a K-FAC capturing layer was called twice in one apply; share parameters "
                     "through separate calls only when 'kfac' is not mutable")
  return value


def _with_bias_column(x, use_bias: bool):
  if not use_bias:
    return x
  return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def _capturing(module: nn.Module) -> bool:
  return not module.is_initializing() and module.is_mutable_collection(KFAC)


def _body(method):
  """A Flax module method without Flax's call wrapper. Our ``__call__`` runs the parent's body
  inside its own call: through ``super().__call__`` interceptors and ``capture_intermediates``
  would see every layer called twice."""
  return method.__wrapped__


def _perturb(module: nn.Module, y):
  if module.is_initializing():
    return y
  return module.perturb(OUTPUTS, y)


class Dense(nn.Dense):
  """``nn.Dense`` with optional capture of inputs and output gradients (module docstring)."""

  @nn.compact
  def __call__(self, inputs):
    if _capturing(self):
      if inputs.ndim < 2:
        raise ValueError(f"K-FAC capture needs a leading example axis, got input shape "
                         f"{inputs.shape}")
      x = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
      self.sow(KFAC, INPUTS, _with_bias_column(x, self.use_bias), reduce_fn=_store_once,
               init_fn=lambda: None)
    return _perturb(self, _body(nn.Dense.__call__)(self, inputs))


def conv_patches(x, kernel_size, strides, padding, input_dilation, kernel_dilation):
  """Input patches of ``lax.conv_general_dilated`` in NHWC layout.

  Args:
    x: [N, *spatial, C].
    kernel_size, strides, input_dilation, kernel_dilation: one int per spatial axis.
    padding: 'SAME', 'SAME_LOWER', 'VALID' or one (low, high) pair per spatial axis.

  Returns:
    [N, *out_spatial, prod(kernel_size)·C], kernel position major and channel minor, so that
    ``conv_patches(x, ...) @ kernel.reshape(-1, features)`` equals the convolution.
  """
  spatial = x.shape[1:-1]
  dilated_k = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(spatial, dilated_k, strides, padding)
  else:
    pads = padding
  config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, input_dilation)]
  xp = lax.pad(x, jnp.zeros((), x.dtype), config + [(0, 0, 0)])
  out = [(n - dk) // s + 1 for n, dk, s in zip(xp.shape[1:-1], dilated_k, strides)]
  slices = []
  for offset in itertools.product(*(range(k) for k in kernel_size)):
    start = [o * d for o, d in zip(offset, kernel_dilation)]
    slices.append(lax.slice(
        xp, [0] + start + [0],
        [xp.shape[0]] + [b + (n - 1) * s + 1 for b, n, s in zip(start, out, strides)]
        + [xp.shape[-1]],
        [1] + list(strides) + [1]))
  patches = jnp.stack(slices, axis=-2)  # [N, *out, P, C]
  return patches.reshape(patches.shape[:-2] + (math.prod(kernel_size) * x.shape[-1],))


class Conv(nn.Conv):
  """``nn.Conv`` with optional capture of input patches and output gradients (module
  docstring). Capture supports shared weights, ``feature_group_count=1``, no mask, and padding
  'SAME', 'SAME_LOWER', 'VALID' or explicit; other settings raise a ValueError when captured."""

  @nn.compact
  def __call__(self, inputs):
    if _capturing(self):
      self.sow(KFAC, INPUTS, self._patches(inputs), reduce_fn=_store_once, init_fn=lambda: None)
    return _perturb(self, _body(nn.Conv.__call__)(self, inputs))

  def _patches(self, inputs):
    kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    rank = len(kernel_size)
    padding = canonicalize_padding(self.padding, rank)
    if isinstance(padding, str) and padding not in ("SAME", "SAME_LOWER", "VALID"):
      raise ValueError(f"K-FAC capture supports Conv padding 'SAME', 'SAME_LOWER', 'VALID' or "
                       f"explicit pairs, got {padding!r}")
    if not self.shared_weights or self.feature_group_count != 1 or self.mask is not None:
      raise ValueError("K-FAC capture supports Conv with shared_weights=True, "
                       f"feature_group_count=1 and no mask, got shared_weights="
                       f"{self.shared_weights}, feature_group_count={self.feature_group_count}, "
                       f"mask={'set' if self.mask is not None else None}")
    if inputs.ndim < rank + 2:
      raise ValueError(f"K-FAC capture needs a leading example axis, got input shape "
                       f"{inputs.shape} for a {rank}-d convolution")

    def per_axis(v):
      return (1,) * rank if v is None else (v,) * rank if isinstance(v, int) else tuple(v)

    flat = inputs.reshape((-1,) + inputs.shape[-rank - 1:])
    patches = conv_patches(flat, kernel_size, per_axis(self.strides), padding,
                           per_axis(self.input_dilation), per_axis(self.kernel_dilation))
    x = patches.reshape(inputs.shape[0], -1, patches.shape[-1])
    return _with_bias_column(x, self.use_bias)


class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` (same parameters, statistics and names) that, when it normalises with its
  running statistics, can expose what exact per-example gradients of its scale γ and offset β
  need: y = γ ⊙ x̂ + β with x̂ = (x − μ)/√(σ² + ε) fixed per example, so for example i

      ∇γ_i = Σ_t x̂_{i,t} ⊙ s_{i,t},     ∇β_i = Σ_t s_{i,t}      (s = ∂ℓ_i/∂y, t over locations)

  x̂ is sown as ``'kfac'/<path>/'normalized'`` [B, T, C] when ``'kfac'`` is mutable, and y goes
  through ``perturb`` as ``'perturbations'/<path>/'norm_outputs'``. With batch statistics
  (training) nothing is captured: the examples interact and have no per-example gradient.
  Capture supports the feature axis last, scale and offset both on, and no mask.
  """

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    running = nn.merge_param("use_running_average", self.use_running_average,
                             use_running_average)
    y = _body(nn.BatchNorm.__call__)(self, x, use_running_average, mask=mask)
    if not running or self.is_initializing():
      return y
    if _capturing(self):
      if self.axis not in (-1, x.ndim - 1) or not (self.use_scale and self.use_bias) or (
          mask is not None) or x.ndim < 2:
        raise ValueError(f"BatchNorm capture supports axis=-1, use_scale=use_bias=True, no mask "
                         f"and a leading example axis; got axis={self.axis}, use_scale="
                         f"{self.use_scale}, use_bias={self.use_bias}, input shape {x.shape}")
      stats = self.variables["batch_stats"]
      xhat = (x - stats["mean"]) * lax.rsqrt(stats["var"] + self.epsilon)
      self.sow(KFAC, NORMALIZED, xhat.reshape(x.shape[0], -1, x.shape[-1]),
               reduce_fn=_store_once, init_fn=lambda: None)
    return self.perturb(NORM_OUTPUTS, y)


def zero_perturbations(model: nn.Module, variables, *args, **kwargs):
  """The zero ``'perturbations'`` collection of ``model`` for these inputs.

  ``args``/``kwargs`` are those of ``model.apply`` (e.g. the batch ``x``, ``train=True``,
  ``rngs=...``); only their shapes matter (``jax.eval_shape``, nothing is computed). The shapes
  depend on the batch size, so build them once per batch shape.
  """
  def perturbations():
    _, state = model.apply(variables, *args, mutable=[PERTURBATIONS, "batch_stats"], **kwargs)
    return state[PERTURBATIONS]

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(perturbations))
