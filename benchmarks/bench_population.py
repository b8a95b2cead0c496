"""Members per hour: the laptop study's populations trained by ``nonuniform_jax.population``, as
the sweep runner trains them, against some of the same members trained as separate trainer runs
one after another, and against the arithmetic floor of the vmapped step.

The members are the study's own (``configs/sweeps/laptop_study.py``: 1,500 steps, logged every
100, evaluated and saved every 500, then the 13 measures at laptop settings on 512 examples),
and the populations the sweep forms (``sweep.populations``): the study's first three of its
first network (MNIST-1D MLP 40-64-64-10), 70 members:

* SGD, batch 128 (32 members): the first population of the network, which compiles the
  measures as well as its own program;
* SGD with weight decay (14) and SAM (24): later populations of the network, which compile
  their own programs and reuse the measures' compilations;
* separate runs: one member of each, by ``train.train`` one after another in the same process
  (the data loaded once, imports done: the kindest case for separate runs), between the
  populations, so that this shared machine's other load falls on both;
* floor: the SGD members' train step alone, vmapped over them and scanned over 100 steps on
  fixed batches (no data, logs, evaluation, measures or checkpoints), per member-step; beside it
  the trainer's jitted step alone, per step.

Wall time is what the goals are about; CPU time (this process's, all threads) is beside it,
because other processes share these cores. The population's own account of its time (the
``population`` entry of each summary: setup, initialisation, steps, evaluation, measures, logs,
checkpoints; first calls include their compilation) and the costliest measures go in the notes.
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
from nonuniform_jax import plan as plan_lib, population, sweep, sweep_config, train

STUDY = "configs/sweeps/laptop_study.py"
CHOSEN = (0, 4, 6)   # the study's populations 1, 5 and 7: SGD, SGD with weight decay, SAM
GOAL = 5.0           # members per hour, populations against separate runs
STUDY_GOAL = 1000    # models trained and measured in an hour on this machine


def study_populations(quick: bool) -> list[list]:
  """The plans of the chosen populations of the laptop study (quick: 4 members of each, 100
  steps)."""
  overrides = ("--config.train.num_steps=100",) if quick else ()
  sweep_spec = sweep_config.read(STUDY, overrides)
  plans = [plan_lib.read(m.config) for m in sweep_config.expand(sweep_spec)]
  groups = sweep.populations(plans, sweep_spec.population_cap)
  return [[plans[i] for i in groups[j]][:4 if quick else None] for j in CHOSEN]


class Clock:
  """Wall and process CPU seconds of a block, and the 1-minute load average after it."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
    self.load = os.getloadavg()[0]


def floor_step_time(plans, steps: int = 100) -> tuple[float, float]:
  """(seconds per member-step of the step vmapped over ``plans`` (differing in seed and learning
  rate) and scanned over ``steps`` fixed batches, seconds per step of the trainer's jitted step
  alone)."""
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
  pops = study_populations(quick)
  root = tempfile.mkdtemp(prefix="bench_population_")
  clocks, summaries, alone, alone_summaries = [], [], [], []

  def population_run(j):
    with Clock() as clock:
      summaries.append(population.train_population(
          pops[j], [f"{root}/population{j}/{i}" for i in range(len(pops[j]))]))
    assert all(s["status"] == "completed" for s in summaries[-1])
    clocks.append(clock)

  def separate_run(j):
    with Clock() as clock:
      alone_summaries.append(train.train(pops[j][1], f"{root}/separate{j}"))
    alone.append(clock)

  try:
    population_run(0)
    separate_run(0)
    population_run(1)
    population_run(2)
    separate_run(1)
    separate_run(2)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  per_member_step, step_alone = floor_step_time(pops[0])
  spreads = [perturbed_spread(p[1]) for p in pops]

  sizes = [len(p) for p in pops]
  total, later = sum(sizes), sum(sizes[1:])
  wall, cpu = sum(c.wall for c in clocks), sum(c.cpu for c in clocks)
  later_wall = sum(c.wall for c in clocks[1:])
  alone_wall = sum(c.wall for c in alone) / len(alone)
  alone_cpu = sum(c.cpu for c in alone) / len(alone)
  gaps = [max(abs(s[1]["final"][k] - a["final"][k]) for k in ("test_accuracy", "test_loss"))
          for s, a in zip(summaries, alone_summaries)]
  measured = [s["measures"] for pop in summaries for s in pop]
  per_measure = sorted(((np.mean([m[name]["seconds"] for m in measured]), name)
                        for name in measured[0]), reverse=True)
  steps = pops[0][0].num_steps
  floor = 3600 / (per_member_step * steps)
  rate = 3600 * total / wall
  loads = ", ".join(f"{c.load:.1f}" for c in clocks + alone)

  def account(j):
    seconds = summaries[j][0]["population"]["seconds"]
    return ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())

  row = {"benchmark": "population trainer, laptop study", "unit": "members/hour"}
  return [
      {**row, "case": f"3 populations ({'+'.join(map(str, sizes))} members) as the sweep "
                      "trains them", "value": rate, "goal": f">= {STUDY_GOAL}",
       "ok": rate >= STUDY_GOAL,
       "note": f"{wall:.0f} s ({3600 * total / cpu:.0f} members per CPU-hour); the study's "
               f"1,088 members at this rate: {1088 / rate:.1f} h"},
      {**row, "case": "first population of the network (SGD)", "value": 3600 * sizes[0]
       / clocks[0].wall, "goal": "", "ok": None,
       "note": f"{clocks[0].wall:.0f} s, compiling the measures too; seconds: {account(0)}"},
      {**row, "case": "later populations of the network (SGD + weight decay, SAM)",
       "value": 3600 * later / later_wall, "goal": "", "ok": None,
       "note": f"{later_wall:.0f} s; seconds, SAM: {account(2)}; measures per member: "
               + ", ".join(f"{name} {t:.2f} s" for t, name in per_measure[:5])
               + f", the other {len(per_measure) - 5} {sum(t for t, _ in per_measure[5:]):.2f} s"},
      {**row, "case": "separate trainer runs, one after another", "value": 3600 / alone_wall,
       "goal": "", "ok": None,
       "note": f"one member of each population, {alone_wall:.1f} s each ({3600 / alone_cpu:.0f} "
               f"per CPU-hour); final test loss and accuracy within "
               f"{', '.join(f'{g:.2g}' for g in gaps)} of their populations', where 1e-7 "
               f"relative noise on the separate runs' initial weights moves them by "
               f"{', '.join(f'{x:.2g}' for x in spreads)}"},
      {**row, "case": "populations / separate runs", "unit": "x", "value": rate * alone_wall
       / 3600, "goal": f">= {GOAL:g}", "ok": rate * alone_wall / 3600 >= GOAL,
       "note": f"in CPU time {alone_cpu * total / cpu:.2f}x; load averages {loads}"},
      {**row, "case": "floor: the vmapped SGD step alone", "value": floor, "goal": "", "ok": None,
       "note": f"{1e3 * per_member_step:.3f} ms per member-step ({sizes[0]} members, 100 steps "
               f"scanned; {steps} steps a member); the trainer's step alone "
               f"{1e3 * step_alone:.3f} ms, {step_alone / per_member_step:.2f}x"},
  ]
