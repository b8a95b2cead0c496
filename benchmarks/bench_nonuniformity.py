"""tr Σ (the per-example gradient noise) at batch 256: fast path, chunked, and a Python loop.

Each time is a ratio to one jitted batch gradient (``jax.grad`` of the mean loss) of the same
model and batch, all measured side by side:

* fast path: capture passes (``optim.kfac`` captures, exact per-layer per-example norms) of
  as many examples as fit the default 256 MiB of captures, and the trace statistics, i.e. what
  ``gradient_noise(method='fast')`` runs, less its per-call
  coverage check (goal <= 2). On ResNet-20 the capture covers BatchNorm's scales and offsets
  too (running statistics, as the measures apply it), so every parameter is on the fast path.
* chunked: per-example gradients ``jax.vmap(jax.grad)`` in chunks, one jitted step per chunk
  with the per-parameter moments, i.e. ``gradient_noise(method='chunked')``.
* Python loop: a jitted single-example gradient-and-accumulate step called once per example
  from Python; a subset of the examples is timed and scaled to the batch (said in the note).
  Goal on an accelerator (GPU, TPU): chunked at least 10x faster than the loop. On a CPU the
  rows are measured without a goal: there a vmapped per-example gradient computes no faster per
  example than a single-example one, so chunking can remove only the loop's dispatch (next
  row).
* the loop's dispatch alone: the same calls with a step that computes nothing. The loop's time
  less this is its compute; chunking removes the dispatch, so loop / chunked exceeds
  loop / (loop − dispatch) only where vmapped per-example gradients compute faster per example
  than single-example ones (a GPU's idle lanes; not a CPU's, measured here).

Peak memory: the temporary buffers (XLA ``memory_analysis``) of the compiled chunk step that
the chunked path runs once per chunk, at two batch sizes with one chunk size, must agree (goal:
ratio <= 1.1, memory bounded by the chunk, not the batch); the ratio between two chunk sizes is
shown beside it. The moments carried between chunks are 3·|θ| floats whatever the batch.

Models: the default MLP (``get_model('mlp', 10)``, inputs [256, 40]) and ResNet-20 (inputs
[256, 32, 32, 3], BatchNorm in eval mode), random seeded data at initialisation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax import lax
from jax.tree_util import Partial

from benchmarks.common import time_fn
from nonuniform_jax import models
from nonuniform_jax.measures import captures, trace_sigma
from nonuniform_jax.measures.moments import zero_moments
from nonuniform_jax.models.layers import zero_perturbations

BATCH = 256
FAST_GOAL = 2.0
LOOP_GOAL = 10.0
MEMORY_GOAL = 1.1
CASES = {  # case -> (model name, input shape, chunk size, examples timed in the loop)
    "default MLP": ("mlp", (40,), 64, 64),
    "ResNet-20": ("resnet20", (32, 32, 3), 32, 16),
}


def _problem(name, shape, batch_size):
  """(loss_fn, capture_loss_fn, perturbations_fn, params, batch), BatchNorm in eval mode."""
  model = models.get_model(name, 10)
  kx, kp = jax.random.split(jax.random.key(0))
  batch = {"x": jax.random.normal(kx, (batch_size,) + shape),
           "y": jnp.arange(batch_size) % 10}
  variables = jax.jit(model.init)(kp, batch["x"][:1])
  stats = {k: v for k, v in variables.items() if k != "params"}

  def loss(stats, params, batch):
    logits = model.apply({"params": params, **stats}, batch["x"], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  def capture(stats, params, perturbations, batch):
    logits, state = model.apply({"params": params, "perturbations": perturbations, **stats},
                                batch["x"], train=False, mutable=["kfac"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]), state["kfac"]

  def perturbations(batch):
    return zero_perturbations(model, variables, batch["x"], train=False)

  return (Partial(loss, stats), Partial(capture, stats), Partial(perturbations),
          variables["params"], batch)


def _chunked(loss_fn, chunk_size):
  """tr Σ as ``gradient_noise(method='chunked')`` computes it (host loop over jitted chunks)."""
  def fn(params, batch):
    moments = trace_sigma.gradient_moments(loss_fn, params, [batch], chunk_size=chunk_size)
    return trace_sigma.moment_statistics(moments, params)["trace_sigma"]
  return fn


def _fast(capture_fn, perturbations_fn, n):
  """tr Σ as ``gradient_noise(method='fast')`` computes it with its default capture budget,
  without its coverage check (a trace of the model by ``jax.eval_shape``, done once per call)."""
  def fn(params, batch):
    means = captures.capture_means(capture_fn, perturbations_fn, params, ((batch, np.int32(0)),),
                                   with_factors=False, capture_bytes=captures.CAPTURE_BYTES)
    return trace_sigma.fast_statistics(means, n)["trace_sigma"]
  return fn


def _loop_seconds(loss_fn, params, batch, count, repeats, dispatch_only=False):
  """Seconds for ``count`` examples, one jitted gradient-and-accumulate call per example.

  ``dispatch_only``: the same calls with the same arguments and results, but a step that
  computes nothing (it returns the accumulator): what the loop spends on dispatch alone.
  """
  @jax.jit
  def step(acc, params, batch, i):
    if dispatch_only:
      return acc[0] + i, acc[1]
    example = jax.tree.map(lambda x: lax.dynamic_slice_in_dim(x, i, 1), batch)
    g = jax.grad(loss_fn)(params, example)
    return acc[0] + otu.tree_vdot(g, g), otu.tree_add(acc[1], g)

  def loop(params, batch):
    acc = (jnp.zeros(()), otu.tree_zeros_like(params))
    for i in range(count):
      acc = step(acc, params, batch, i)
    return acc

  return time_fn(loop, params, batch, repeats=repeats, warmup=1)


def _temp_bytes(loss_fn, params, batch, chunk_size) -> int:
  """Temporary buffers of the compiled chunk step (arguments such as the batch excluded)."""
  moments = zero_moments(params)
  compiled = trace_sigma.chunk_moments.lower(moments, loss_fn, None, params, batch, np.int32(0),
                                             chunk_size=chunk_size).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def _timing_rows(case, name, shape, chunk_size, loop_count, quick):
  batch_size = 16 if quick and len(shape) > 1 else BATCH
  if quick:
    chunk_size, loop_count = min(chunk_size, 8), min(loop_count, 4)
  repeats = 2 if quick else 10
  accelerator = jax.default_backend() != "cpu"
  loss_fn, capture_fn, perturbations_fn, params, batch = _problem(name, shape, batch_size)
  uncovered = captures.uncovered(params, capture_fn, perturbations_fn, ((batch, np.int32(0)),))
  grad_s = time_fn(jax.jit(jax.grad(loss_fn)), params, batch, repeats=repeats)
  fast_s = time_fn(_fast(capture_fn, perturbations_fn, batch_size), params, batch,
                   repeats=repeats)
  per_example = captures.capture_bytes_per_example(capture_fn, perturbations_fn, params, batch)
  fast_chunk = min(batch_size, max(1, captures.CAPTURE_BYTES // per_example))
  chunked_s = time_fn(_chunked(loss_fn, chunk_size), params, batch, repeats=repeats)
  loop_s = _loop_seconds(loss_fn, params, batch, loop_count, max(repeats // 2, 1))
  dispatch_s = _loop_seconds(loss_fn, params, batch, loop_count, max(repeats // 2, 1),
                             dispatch_only=True)
  loop_s, dispatch_s = (t * batch_size / loop_count for t in (loop_s, dispatch_s))
  # Batching can remove the loop's dispatch; its compute per example it can remove only where a
  # vmapped per-example gradient computes faster per example than a single-example one.
  bound = loop_s / max(loop_s - dispatch_s, 1e-12)
  base = {"benchmark": f"tr Σ, batch {batch_size}", "case": case}
  ms = lambda s: f"{1e3 * s:.1f} ms"
  fast_note = (f"{ms(fast_s)}, {fast_chunk} examples per capture pass "
               f"({per_example / 2**20:.2f} MiB each); batch gradient {ms(grad_s)}")
  if uncovered:
    fast_note += (f"; {len(uncovered)} parameters not captured (e.g. {uncovered[0]}), so "
                  "gradient_noise runs chunked here: this times the capture pass alone")
  return [
      {**base, "case": f"{case}: fast path", "value": fast_s / grad_s, "unit": "x gradient",
       "goal": f"<= {FAST_GOAL:g}", "ok": fast_s / grad_s <= FAST_GOAL and not uncovered,
       "note": fast_note},
      {**base, "case": f"{case}: chunked per-example", "value": chunked_s / grad_s,
       "unit": "x gradient", "goal": "", "ok": None,
       "note": f"{ms(chunked_s)}, chunks of {chunk_size}"},
      {**base, "case": f"{case}: Python loop", "value": loop_s / grad_s, "unit": "x gradient",
       "goal": "", "ok": None,
       "note": f"{ms(loop_s)}: {loop_count} of {batch_size} examples timed, scaled"},
      {**base, "case": f"{case}: Python loop, dispatch alone", "value": dispatch_s / grad_s,
       "unit": "x gradient", "goal": "", "ok": None,
       "note": f"{ms(dispatch_s)}: the loop's calls with a step that computes nothing; "
               f"removing all of it would make the loop {bound:.2f}x faster"},
      {**base, "case": f"{case}: loop / chunked", "value": loop_s / chunked_s,
       "unit": "x faster", "goal": f">= {LOOP_GOAL:g}" if accelerator else "",
       "ok": loop_s / chunked_s >= LOOP_GOAL if accelerator else None,
       "note": "chunked per-example gradients against the Python loop" + (
           "" if accelerator else f"; the {LOOP_GOAL:g}x goal is for an accelerator only")},
  ]


def _memory_rows(quick):
  small, large = (8, 32) if quick else (16, 64)
  n = 64 if quick else BATCH
  loss_fn, _, _, params, batch = _problem("mlp", (40,), 2 * n)
  half = jax.tree.map(lambda x: x[:n], batch)
  at_n = _temp_bytes(loss_fn, params, half, small)
  at_2n = _temp_bytes(loss_fn, params, batch, small)
  at_large = _temp_bytes(loss_fn, params, half, large)
  mib = lambda b: f"{b / 2**20:.2f} MiB"
  base = {"benchmark": "tr Σ chunked: compiled temp memory", "unit": "ratio"}
  return [
      {**base, "case": f"default MLP: batch {2 * n} / batch {n}, chunk {small}",
       "value": at_2n / at_n, "goal": f"<= {MEMORY_GOAL:g}", "ok": at_2n / at_n <= MEMORY_GOAL,
       "note": f"{mib(at_2n)} against {mib(at_n)}"},
      {**base, "case": f"default MLP: chunk {large} / chunk {small}, batch {n}",
       "value": at_large / at_n, "goal": "", "ok": None,
       "note": f"{mib(at_large)} against {mib(at_n)}"},
  ]


def run(quick: bool) -> list[dict]:
  rows = []
  for case, (name, shape, chunk_size, loop_count) in CASES.items():
    if name not in models.MODELS:
      rows.append({"benchmark": f"tr Σ, batch {BATCH}", "case": case, "value": float("nan"),
                   "unit": "x gradient", "goal": "", "ok": None,
                   "note": f"skipped: model {name!r} is not registered"})
      continue
    rows += _timing_rows(case, name, shape, chunk_size, loop_count, quick)
  return rows + _memory_rows(quick)
