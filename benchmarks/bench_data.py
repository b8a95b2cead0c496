"""Input pipeline rate against the training step it feeds (goal: the pipeline >= 5x the step).

* MNIST-1D training iterator (batch 128) against the trainer's SGD step of the default MLP
  (whose examples per second are reported as the default model's training throughput).
* CIFAR-shaped in-memory pipeline with augmentation (random uint8 images of CIFAR's size, crop
  + flip + normalisation, batch 128) against a ResNet-20 SGD-momentum step with BatchNorm.

Rates are host batches per second over chunks of consecutive batches (so epoch boundaries and
their permutations are included), against steps per second of the step on one fixed batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.common import time_fn
from nonuniform_jax import data, models, steps
from nonuniform_jax.data import pipeline, preprocessing

BATCH = 128
GOAL = 5.0


def _sgd_step(model, variables, tx):
  """The trainer's own jitted step (``steps.make_train_step``) and its initial state."""
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}),
                           opt_state=tx.init(variables["params"]))
  return jax.jit(steps.make_train_step(model, tx, seed=0)), state


def _rates(iterator, step, state, chunk, repeats):
  batch = jax.tree.map(jnp.asarray, next(iterator))
  pipeline_s = time_fn(lambda: [next(iterator) for _ in range(chunk)], repeats=repeats,
                       warmup=1) / chunk
  step_s = time_fn(step, state, batch, repeats=repeats, warmup=1)  # warm-up = compilation
  return 1.0 / pipeline_s, 1.0 / step_s


def _row(case, pipeline_rate, step_rate, note):
  ratio = pipeline_rate / step_rate
  return {"benchmark": "data pipeline", "case": case, "value": ratio, "unit": "x step rate",
          "goal": f">= {GOAL:g}", "ok": ratio >= GOAL,
          "note": f"pipeline {pipeline_rate:.0f} batches/s ({pipeline_rate * BATCH:.0f} "
                  f"examples/s); step {step_rate:.1f} steps/s; {note}"}


def run(quick: bool) -> list[dict]:
  rows = []
  ds = data.get_datasets("mnist1d", seed=0)
  model = models.get_model("mlp", ds.num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + ds.input_shape))
  step, state = _sgd_step(model, variables, optax.sgd(0.1))
  p, s = _rates(ds.train.train_batches(BATCH, seed=0), step, state, chunk=200,
                repeats=5 if quick else 30)
  rows.append(_row("MNIST-1D iterator vs MLP SGD step", p, s, "batch 128, default MLP"))
  rows.append({"benchmark": "training throughput", "case": "default MLP, SGD, batch 128",
               "value": s * BATCH, "unit": "examples/s", "goal": "", "ok": None,
               "note": f"{1e3 / s:.2f} ms per step (the trainer's jitted step); absolute: "
                       "this machine only"})

  if "resnet20" not in models.MODELS:
    rows.append({"benchmark": "data pipeline", "case": "CIFAR pipeline vs ResNet-20 step",
                 "value": float("nan"), "unit": "x step rate", "goal": f">= {GOAL:g}",
                 "ok": None, "note": "skipped: model resnet20 not registered"})
    return rows
  n = 5_000 if quick else 50_000
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  source = pipeline.ArraySource(
      images, np.arange(n) % 10,
      preprocess=preprocessing.Normalize(*preprocessing.NORMALIZATION["cifar10"]),
      augment=preprocessing.random_crop_flip)
  model = models.get_model("resnet20", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  step, state = _sgd_step(model, variables, optax.sgd(0.1, momentum=0.9))
  p, s = _rates(source.train_batches(BATCH, seed=0), step, state, chunk=20 if quick else 100,
                repeats=2 if quick else 10)
  rows.append(_row("CIFAR in-memory pipeline (crop+flip) vs ResNet-20 SGD step", p, s,
                   f"batch 128, {n} random uint8 32x32x3 images"))
  return rows
