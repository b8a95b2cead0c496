"""Members per hour: a population trained at once (``nonuniform_jax.population``) against the
same members trained as separate trainer runs one after another, and against the arithmetic
floor of the vmapped step.

The members: 40-64-64-10 MLPs on MNIST-1D, SGD with momentum 0.9 and weight decay, cosine
learning rate, batch 128, differing in seed and learning rate; each logs every 100 steps,
evaluates every 500, saves a checkpoint every 1000 and at the end, and measures at the end
λ_max, tr H, SAM sharpness, tr Σ (fast path) and Wu's s on 1024 training examples: a model of
the correlation study, trained and measured. Every run writes its whole workdir.

* population, first of its shape: one population in a process that has compiled nothing for
  it (a sweep's first population of each shape);
* population, later of its shape: a second population of other members of the same shape,
  which reuses the first's compilations (every later population of a sweep);
* separate runs: ``train.train`` for a few of the same members, one after another in the same
  process (the data loaded once, imports done: the kindest case for separate runs);
* floor: the train step alone, vmapped over the members and scanned over 100 steps on fixed
  batches (no data, logs, evaluation, measures or checkpoints), per member-step; beside it the
  trainer's jitted step alone, per step.

The population's own account of its time (the ``population`` entry of each summary: setup,
initialisation, steps, evaluation, measures, logs, checkpoints; first calls include their
compilation) goes in the notes.
"""

import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks.common import time_fn
from configs import default
from nonuniform_jax import plan as plan_lib, population, train

GOAL = 5.0          # members per hour, population against separate runs
STUDY_GOAL = 1000   # models trained and measured in an hour on this machine
MEASURES = ("lambda_max", "hessian_trace", "sam_sharpness", "gradient_noise",
            "wu_nonuniformity")


def config(seed: int, learning_rate: float, num_steps: int):
  c = default.get_config()
  c.seed, c.num_steps, c.progress = seed, num_steps, False
  c.model.widths = (64, 64)
  c.optimizer.learning_rate, c.optimizer.weight_decay = learning_rate, 5e-4
  c.log_every, c.eval_every, c.checkpoint_every = 100, 500, 1000
  c.measures.names = MEASURES
  c.measures.settings.gradient_noise.method = "fast"
  return c


def members(first_seed: int, count: int, num_steps: int) -> list:
  rates = (0.05, 0.1, 0.2)
  return [plan_lib.read(config(first_seed + i, rates[i % len(rates)], num_steps))
          for i in range(count)]


class Clock:
  """Wall and process CPU seconds of a block, and the 1-minute load average after it (this
  machine is shared: other processes' load shows in wall time, far less in CPU time)."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
    self.load = os.getloadavg()[0]


def timed_population(plans, root) -> tuple[Clock, list]:
  with Clock() as clock:
    summaries = population.train_population(plans, [f"{root}/{i}" for i in range(len(plans))])
  assert all(s["status"] == "completed" for s in summaries)
  return clock, summaries


def timed_separate(plans, root) -> tuple[Clock, list]:
  with Clock() as clock:
    summaries = [train.train(p, f"{root}/{i}") for i, p in enumerate(plans)]
  return clock, summaries


def floor_step_time(plans, steps: int = 100) -> tuple[float, float]:
  """(seconds per member-step of the step vmapped over ``plans`` and scanned over ``steps``
  fixed batches, seconds per step of the trainer's jitted step alone)."""
  plan = plans[0]
  run = train.build(plan)
  rates = jnp.asarray([p.optimizer.settings["optimizer"]["learning_rate"] for p in plans])
  seeds = jnp.arange(len(plans), dtype=jnp.int32)
  x = train.example_input(run.datasets)

  def member(rate, seed):
    settings = {**plan.optimizer.settings,
                "optimizer": {**plan.optimizer.settings["optimizer"], "learning_rate": rate}}
    tx = train.optimizer(plan, run.num_steps, run.context, settings)[1]
    return train.train_step(plan, run.objective, tx, seed), tx

  def init(rate, seed):
    return train.initial_state(run.objective.model, member(rate, seed)[1], x, seed)

  batch = next(run.datasets.train.train_batches(plan.batch_size, 0))
  batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (steps, len(plans)) + a.shape), batch)

  def scanned(states, batches):
    def body(states, batch):
      return jax.vmap(lambda r, s, st, b: member(r, s)[0](st, b))(rates, seeds, states, batch)
    return lax.scan(body, states, batches)

  states = jax.jit(jax.vmap(init))(rates, seeds)
  together = time_fn(jax.jit(scanned), states, batches, repeats=5, warmup=1)
  step = jax.jit(train.train_step(plan, run.objective, run.tx, plan.seed))
  alone = time_fn(step, run.state, jax.device_put(batch), repeats=200, warmup=2)
  return together / (steps * len(plans)), alone


def perturbed_spread(plan) -> float:
  """How far a separate run's final test loss and accuracy move when its initial weights are
  perturbed by 1e-7 relative noise (the trainer's step, the same batches): the resolution at
  which float32 fixes where a run of this length ends."""
  run = train.build(plan)
  step = jax.jit(train.train_step(plan, run.objective, run.tx, plan.seed))

  def final(state):
    batches = run.datasets.train.train_batches(plan.batch_size, plan.data.seed)
    for _ in range(run.num_steps):
      state, _ = step(state, next(batches))
    return train.evaluate_state(plan, run, state)

  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(run.state.params))))
  noisy = jax.tree.map(lambda p: p * (1 + 1e-7 * jax.random.normal(next(keys), p.shape)),
                       run.state.params)
  a, b = final(run.state), final(run.state.replace(params=noisy))
  return max(abs(a[k] - b[k]) for k in ("test_accuracy", "test_loss"))


def run(quick: bool) -> list[dict]:
  count, num_steps, separate = (8, 300, 2) if quick else (32, 3000, 4)
  root = tempfile.mkdtemp(prefix="bench_population_")
  later = members(count, count, num_steps)
  half = separate // 2
  try:
    # Separate runs between the populations, so that other processes' load falls on both.
    cold, cold_summaries = timed_population(members(0, count, num_steps), f"{root}/cold")
    first, first_summaries = timed_separate(later[:half], f"{root}/separate_a")
    warm, warm_summaries = timed_population(later, f"{root}/warm")
    second, second_summaries = timed_separate(later[half:separate], f"{root}/separate_b")
  finally:
    shutil.rmtree(root, ignore_errors=True)
  per_member_step, step_alone = floor_step_time(members(0, count, num_steps))
  spread = max(perturbed_spread(p) for p in later[:2])

  alone_wall = (first.wall + second.wall) / separate
  alone_cpu = (first.cpu + second.cpu) / separate
  # The separate runs are of the later population's first members: how far apart they end.
  gaps = [max(abs(a["final"][k] - b["final"][k]) for k in ("test_accuracy", "test_loss"))
          for a, b in zip(warm_summaries, first_summaries + second_summaries)]
  per_measure = {name: np.mean([s["measures"][name]["seconds"] for s in warm_summaries])
                 for name in MEASURES}
  iterations = {name: max(s["measures"][name]["iterations"] for s in warm_summaries)
                for name in ("lambda_max", "wu_nonuniformity")}
  what = (f"{count} members, 40-64-64-10 MLP, MNIST-1D, SGD, {num_steps} steps of batch 128, "
          f"5 measures at the end")
  row = {"benchmark": "population trainer", "unit": "members/hour"}
  floor = 3600 / (per_member_step * num_steps)

  def account(summaries):
    return ", ".join(f"{k} {v:.1f} s"
                     for k, v in summaries[0]["population"]["seconds"].items())

  def times(clock, n):
    return (f"{clock.wall:.1f} s ({3600 * n / clock.cpu:.0f} members per CPU-hour, load "
            f"{clock.load:.1f})")

  return [
      {**row, "case": "population, first of its shape", "value": 3600 * count / cold.wall,
       "goal": "", "ok": None,
       "note": f"{what}: {times(cold, count)}: {account(cold_summaries)}"},
      {**row, "case": "population, later of its shape", "value": 3600 * count / warm.wall,
       "goal": f">= {STUDY_GOAL}", "ok": 3600 * count / warm.wall >= STUDY_GOAL,
       "note": f"{times(warm, count)}: {account(warm_summaries)}; measures per member: "
               + ", ".join(f"{k} {v:.2f} s" for k, v in per_measure.items())
               + "; most iterations: "
               + ", ".join(f"{k} {v}" for k, v in iterations.items())},
      {**row, "case": "separate trainer runs, one after another", "value": 3600 / alone_wall,
       "goal": "", "ok": None,
       "note": f"{separate} of the later population's members, {alone_wall:.1f} s each "
               f"({3600 / alone_cpu:.0f} per CPU-hour; load {first.load:.1f}, "
               f"{second.load:.1f}); their final test loss and accuracy within "
               f"{max(gaps):.2g} of the population's, where 1e-7 relative noise on a separate "
               f"run's initial weights moves them by up to {spread:.2g}"},
      {**row, "case": "population (later) / separate runs", "unit": "x",
       "value": alone_wall * count / warm.wall, "goal": f">= {GOAL:g}",
       "ok": alone_wall * count / warm.wall >= GOAL,
       "note": f"in CPU time {alone_cpu * count / warm.cpu:.2f}x; first of its shape "
               f"{alone_wall * count / cold.wall:.2f}x"},
      {**row, "case": "floor: the vmapped step alone", "value": floor, "goal": "", "ok": None,
       "note": f"{1e3 * per_member_step:.3f} ms per member-step ({count} members, 100 steps "
               f"scanned); the trainer's step alone {1e3 * step_alone:.3f} ms per step, "
               f"{step_alone / per_member_step:.2f}x"},
      {**row, "case": "population (later) / floor", "unit": "x",
       "value": count * 3600 / warm.wall / floor, "goal": "", "ok": None,
       "note": "the fraction of the arithmetic floor the population reaches"},
  ]
