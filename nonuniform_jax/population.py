"""Populations: training runs that differ only in values that keep shapes, trained at once.

    key = population.shape_key(plan)          # equal for plans that can train together
    summaries = population.train_population(plans, workdirs)

Runs whose configs differ only in ``POPULATION_KEYS`` (seeds and data seeds, learning rate,
momentum, weight decay, Adam's β1 and β2, SAM's ρ and ASAM's η, CSAM's ρ1, ρ2 and α, label
smoothing, the label-noise rate) compute the same program on different numbers. A population
runs them as one: its members' train states are stacked along a leading axis and one compiled
function steps them all, ``jax.vmap`` over the members, with those settings as traced arrays
from which the optimizer, its schedule and the objective are built inside the vmapped function
(``train.optimizer``, ``train.train_step``: the trainer's own pieces), and ``lax.scan`` over the
steps up to the next one at which anything is logged, evaluated, measured or saved: one
dispatch per stretch of steps, not per step. On a CPU, a model with convolutions steps its
members one after another within that function (``lax.map``) instead of vmapped: XLA:CPU runs a
vmapped convolution as a grouped one, about half as fast (``steps_one_after_another``).

Each member sees what its separate run sees: its initialisation (the trainer's
``initial_state``, vmapped over the seeds), its training subset and labels (label noise drawn by
its data seed: ``data.get_datasets``), its batch order (``ArraySource.train_indices``, the
pipeline's own order, its examples gathered on the device from the preprocessed training set)
and its dropout keys. Each writes its own workdir as ``train.train`` would, through the
trainer's own phases (``train.ended_run``, ``open_run``, ``close_run``) and holding its
workdir's lock throughout: config.json, metrics.jsonl (the same records, keys and steps),
measures.jsonl, dataset.json, its own checkpoints (its state alone, the Orbax layout and meta of
``checkpoints.py``: ``nonuniform_jax.measure`` and a separate rerun resume from them) and
summary.json (with ``population``: its size and the member's place in it). Values agree with the
separate run's within float32 rounding: vmapped products may sum in another order, and a traced
setting enters float32 arithmetic where the separate run folds a Python constant (1 − α).
timing.jsonl holds the population's time per step, every member's together.

Evaluation runs over the population the same way (``Objective.eval_sums`` vmapped; members
without label noise get the noisy members' fields, all clean, and report none of them). The
measures run member by member (``evaluators.run``, each on its member's subset): every measure
returns host numbers, its jitted kernel is private to its module, and vmapped those kernels ran
no faster on a 2-core CPU. They compile once per network and process: every member of every
population of one network uses the same measure functions (plain cross-entropy in float32,
the BatchNorm statistics an argument).

What must match (``shape_key``): everything else in the config, and whether momentum and
weight decay are on at all (on, each adds a transformation and its state to the chain; label
smoothing and an L2 term of 0 compute exactly what their absence does, so they are traced
whatever their value). Not in ``POPULATION_KEYS``: a dropout rate (the models hold it as a
static module attribute on which Flax's Dropout branches in Python; tracing it would need every
dropout model to take it as an input). Trained ``alone`` (a population of one, by
``train.train``): runs on several devices or processes, on streamed data, with augmentation
(drawn on the host batch by batch; ``augment=False`` trains CIFAR without it), or with a seed
beyond int32.

Resuming: a member that completed or diverged is not retrained (its summary is returned); every
other member resumes from its own newest intact checkpoint. The population runs from the
earliest of them; a member that resumes later is carried along unchanged (its update masked)
until the population reaches its step, and a member that diverges stops there (its summary says
so) while the others go on. Ctrl-C or SIGTERM ends the population with ``train.Interrupted``
after every member's checkpoint being written is finished; the same call resumes it.
"""

import collections
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nonuniform_jax import checkpoints, evaluators, plan as plan_lib, train, workdir as wd
from nonuniform_jax.data import datasets
from nonuniform_jax.objective import Objective

POPULATION_KEYS = ("seed", "data_seed", "optimizer.learning_rate", "optimizer.momentum",
                   "optimizer.weight_decay", "optimizer.b1", "optimizer.b2", "sam.rho",
                   "sam.eta", "csam.rho1", "csam.rho2", "csam.alpha", "label_smoothing",
                   "label_noise.kind", "label_noise.rate")
# Whether these are zero decides the optimizer's state (a transformation more or less in its
# chain): part of the shape key. (Label smoothing and an L2 term of 0 compute exactly what their
# absence does, so they are traced whatever their value.)
SWITCHES = ("optimizer.momentum", "optimizer.weight_decay")
# These choose the data only (read on the host): never traced.
DATA_KEYS = ("data_seed", "label_noise.kind", "label_noise.rate")


def _setting(config: dict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


# Models without convolutions. On a CPU, the members of a population of any other model step one
# after another inside the compiled step (``lax.map``) rather than vmapped: XLA:CPU runs a
# vmapped convolution (one kernel per member) as a grouped convolution, and 8 members of the
# laptop study's 1-D CNN (channels 16, 32) trained 300 SAM steps in 32 s so against 66 s
# vmapped, its 2-D CNN on the digits in 51 s against 90 s.
DENSE_MODELS = ("mlp", "paper_mlp")


def steps_one_after_another(plan: plan_lib.Plan) -> bool:
  """Whether a population of ``plan``'s shape steps its members by ``lax.map`` (convolutional
  models on a CPU) rather than ``jax.vmap``."""
  return jax.devices()[0].platform == "cpu" and plan.model.name not in DENSE_MODELS


def alone(plan: plan_lib.Plan) -> str | None:
  """Why the run of ``plan`` cannot share a vmapped program, or None. Such a run is a
  population of one (``shape_key``), which ``train_population`` trains by ``train.train``."""
  flat = wd.flatten(plan.config)
  dataset, seed = flat.get("dataset"), flat.get("seed", 0)
  devices = flat.get("parallel.num_devices") or jax.device_count()
  if dataset in datasets.TFDS_STREAMING:
    return f"{dataset!r} is streamed"
  if flat.get("augment") and dataset in datasets.AUGMENTED:
    return f"{dataset!r} is augmented on the host, batch by batch"
  if devices > 1 or jax.process_count() > 1:
    return f"it runs on {devices} devices in {jax.process_count()} processes"
  if not 0 <= seed < 2**31:
    return f"its seed {seed} is not an int32"
  if flat.get("model.pretrained"):
    return "it starts from a published checkpoint"
  return None


def shape_key(plan: plan_lib.Plan) -> str:
  """A digest equal for plans that can train together: of the config without
  ``POPULATION_KEYS`` and the presentation settings (``workdir.PRESENTATION_KEYS``), with
  whether each of ``SWITCHES`` is on; of the whole config for a run that trains ``alone``."""
  flat = wd.flatten(plan.config)
  if alone(plan):
    kept = {"alone": flat}
  else:
    kept = {k: v for k, v in flat.items()
            if k not in POPULATION_KEYS and k not in wd.PRESENTATION_KEYS}
    kept.update({f"{k} > 0": bool((flat.get(k) or 0) > 0) for k in SWITCHES})
  text = json.dumps(kept, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check(plans: list, workdirs: list) -> None:
  """One-line refusals of what a population cannot train, before anything is read."""
  if not plans or len(plans) != len(workdirs):
    raise ValueError(f"a population needs one workdir per plan, got {len(plans)} plans and "
                     f"{len(workdirs)} workdirs")
  if len({w if wd.is_remote(w) else os.path.abspath(w) for w in workdirs}) < len(workdirs):
    raise ValueError(f"a population's workdirs must differ, got {workdirs}")
  keys = [shape_key(p) for p in plans]
  for plan, key, workdir in zip(plans, keys, workdirs):
    if key != keys[0]:
      first = {k: v for k, v in wd.flatten(plans[0].config).items() if k not in POPULATION_KEYS}
      other = {k: v for k, v in wd.flatten(plan.config).items() if k not in POPULATION_KEYS}
      diffs = sorted(k for k in set(first) | set(other)
                     if first.get(k) != other.get(k) and k not in wd.PRESENTATION_KEYS)
      diffs = diffs or [f"whether {k} is > 0" for k in SWITCHES
                        if (_setting(plans[0].config, k) > 0) != (_setting(plan.config, k) > 0)]
      raise ValueError(f"the member for {workdir!r} cannot train with the first: they differ "
                       f"in {', '.join(diffs[:5])}; only {', '.join(POPULATION_KEYS)} may "
                       "differ within a population (population.shape_key groups them)")
  for workdir in workdirs:
    wd.check_writable(workdir)


class _Member:
  """One member's trainer pieces: its plan, run, checkpoints and opened workdir."""

  def __init__(self, plan: plan_lib.Plan, workdir: str):
    self.plan, self.workdir = plan, workdir
    self.ckpts = checkpoints.Checkpoints(workdir, plan.keep_checkpoints)
    self.run: train.Run | None = None
    self.opened: train.Opened | None = None
    self.diverged: int | None = None
    self.window: list = []
    self.summary: dict | None = None


def _traced_values(plans: list) -> dict:
  """The settings traced in the population's program, one array [members] each: every key of
  ``POPULATION_KEYS`` the step reads (not the data's) that is on."""
  out = {}
  for key in POPULATION_KEYS:
    if key in DATA_KEYS:
      continue
    values = [_setting(p.config, key) for p in plans]
    if key in SWITCHES and not values[0] > 0:   # off in every member (the shape key)
      continue
    out[key] = jnp.asarray(values, jnp.int32 if key == "seed" else jnp.float32)
  return out


def _settings_with(settings: dict, values: dict) -> dict:
  """The optimizer's settings (nested dicts) with the traced values in place."""
  out = copy.deepcopy(settings)
  for key, value in values.items():
    group, _, leaf = key.partition(".")
    if leaf and group in out:
      out[group][leaf] = value
  return out


def _select(live, new, old):
  """``new`` where the member is live, else ``old`` (leaves with a leading member axis)."""
  return jnp.where(live.reshape(live.shape + (1,) * (new.ndim - 1)), new, old)


class _Program:
  """The population's compiled functions, built from its first member (the others differ only
  in the traced values): initialisation, a stretch of steps, evaluation, and the objective
  whose measure functions every member's measures use (``_measure_objective``)."""

  def __init__(self, plan: plan_lib.Plan, run: train.Run):
    self.objective = _measure_objective(plan, run)
    model = run.objective.model
    x = train.example_input(run.datasets)
    in_loss = plan.optimizer.weight_decay_in_loss
    one_after_another = steps_one_after_another(plan)

    def tx_of(values):
      settings = _settings_with(plan.optimizer.settings, values)
      return train.optimizer(plan, run.num_steps, run.context, settings)[1]

    def init(values):
      return train.initial_state(model, tx_of(values), x, values["seed"])

    def member_step(values, state, batch, kfac_due):
      objective = Objective(
          model, label_smoothing=values.get("label_smoothing", plan.label_smoothing),
          l2=values.get("optimizer.weight_decay", plan.optimizer.l2) if in_loss else 0.0,
          precision=plan.precision)
      step = train.train_step(plan, objective, tx_of(values), values["seed"])
      return step(state, batch, kfac_due)

    def stretch(states, values, tables, indices, step_numbers, live_from, live_to, kfac_due):
      """Steps ``step_numbers`` [T] of every member: ``indices`` [T, members, batch] are the
      positions of each member's examples; a member is live at step s when
      live_from < s <= live_to (else its state is kept). Returns the states and the step
      metrics [T, members]."""
      inputs, member_inputs, labels = tables

      def body(states, xs):
        idx, step = xs

        def one(v, state, u, y, i):
          return member_step(v, state, {"inputs": inputs[u, i], "labels": y[i]}, kfac_due)

        if one_after_another:
          new, metrics = lax.map(lambda a: one(*a), (values, states, member_inputs, labels, idx))
        else:
          new, metrics = jax.vmap(one)(values, states, member_inputs, labels, idx)
        live = (step > live_from) & (step <= live_to)
        return jax.tree.map(lambda n, o: _select(live, n, o), new, states), metrics

      return lax.scan(body, states, (indices, step_numbers))

    # One member after another (lax.map): initialisation runs once per population, and
    # compiles in half the time of its vmapped form.
    self.init = jax.jit(lambda values: lax.map(init, values))
    self.stretch = jax.jit(stretch, static_argnames="kfac_due", donate_argnums=0)
    self.eval_shared = jax.jit(jax.vmap(run.objective.eval_sums, in_axes=(0, 0, None)))
    self.eval_own = jax.jit(jax.vmap(run.objective.eval_sums))


# Compilations kept for the populations that follow in this process: the programs of the last
# few shapes (a sweep's members beyond one population), and one objective per network for the
# measures, whose compilations depend on the network alone (a sweep's populations of one
# network but other optimizers, batches or weight decays reuse them).
_PROGRAMS: "collections.OrderedDict[str, _Program]" = collections.OrderedDict()
_MEASURE_OBJECTIVES: "collections.OrderedDict[str, Objective]" = collections.OrderedDict()
KEPT = 8


def _kept(cache: collections.OrderedDict, key: str, make):
  if key not in cache:
    cache[key] = make()
    while len(cache) > KEPT:
      cache.popitem(last=False)
  cache.move_to_end(key)
  return cache[key]


def _program(plan: plan_lib.Plan, run: train.Run) -> _Program:
  return _kept(_PROGRAMS, shape_key(plan), lambda: _Program(plan, run))


def _measure_objective(plan: plan_lib.Plan, run: train.Run) -> Objective:
  """The objective whose measure functions (plain cross-entropy, float32: the training
  settings do not enter them) the members of every population of this network use."""
  key = json.dumps([plan.model.name, plan.model.kwargs, plan.data.input_shape,
                    plan.data.num_classes], default=str)
  return _kept(_MEASURE_OBJECTIVES, key, lambda: Objective(run.objective.model))


class _Data(NamedTuple):
  """The members' data on the device: ``tables`` (the distinct preprocessed training sets
  [U, n, ...], each member's one [members], each member's labels [members, n]), the test
  batches (shared), the training-subset batches stacked over members, each member's measured
  subset (host arrays, ``evaluators.subset_batches``) and whether it trains without label noise
  (its training-subset batches were given the fields of the noisy members', all clean)."""
  tables: tuple
  test: list
  train_eval: list
  measured: list
  clean: list


def _data(members: list) -> _Data:
  plan = members[0].plan
  sources = [m.run.datasets.train for m in members]   # ArraySources (``_check``)
  # The training set is a function of the data seed when a subset is drawn, else shared.
  distinct, which = {}, []
  for m, source in zip(members, sources):
    key = m.plan.data.seed if plan.data.num_train_examples else None
    if key not in distinct:
      distinct[key] = (len(distinct), source.preprocess(source.inputs))
    which.append(distinct[key][0])
  inputs = jnp.asarray(np.stack([x for _, x in distinct.values()]))
  labels = jnp.asarray(np.stack([s.labels for s in sources]))
  tables = (inputs, jnp.asarray(which, jnp.int32), labels)
  batch = plan.devices.eval_batch
  test = [jax.device_put(b) for b in members[0].run.datasets.test.eval_batches(batch)]
  clean = [m.plan.data.label_noise == "none" for m in members]
  per_member = [[_with_noise_fields(b) if c and not all(clean) else b
                 for b in m.run.datasets.train_eval.eval_batches(batch)]
                for m, c in zip(members, clean)]
  train_eval = [jax.device_put(jax.tree.map(lambda *xs: np.stack(xs), *batches))
                for batches in zip(*per_member)]
  measures = plan.measures
  measured = ([evaluators.subset_batches(m.run.datasets.train_eval, measures.num_examples,
                                         measures.batch_size) for m in members]
              if measures.items else [None] * len(members))
  return _Data(tables, test, train_eval, measured, clean)


def _with_noise_fields(batch: dict) -> dict:
  """A clean training-subset batch with the fields of a noisy one: nothing flipped."""
  return {**batch, "noisy": np.zeros_like(batch["mask"]), "clean_labels": batch["labels"]}


def _member_state(states, k: int):
  return jax.tree.map(lambda x: x[k], states)


def _stack(states: list):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _evaluate(program: _Program, states, d: _Data) -> list[dict]:
  """Every member's evaluation record (``train.evaluation``), summed batch by batch in the
  order of a separate run."""
  def total(fn, batches):
    totals = None
    for batch in batches:
      sums = fn(states.params, states.batch_stats, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    return jax.device_get(totals)

  test, own = total(program.eval_shared, d.test), total(program.eval_own, d.train_eval)
  return [train.evaluation({k: v[i] for k, v in test.items()},
                           {k: v[i] for k, v in own.items()
                            if not (clean and k.startswith("noisy_"))})
          for i, clean in enumerate(d.clean)]


def _events(plan: plan_lib.Plan, first: int, last: int) -> list[int]:
  """The steps after ``first`` up to ``last`` at which a separate run logs (and evaluates,
  measures or saves)."""
  return [s for s in range(first + 1, last + 1)
          if s % plan.log_every == 0 or s % plan.eval_every == 0
          or s % plan.checkpoint_every == 0 or plan.measures.due(s, s == last) or s == last]


def _stretches(plan: plan_lib.Plan, first: int, last: int, events: list[int]):
  """(start, end, kfac_due) of the stretches of steps between ``first`` and ``last``: each ends
  at an event; with K-FAC statistics, each step that refreshes them is a stretch of its own
  (its program computes the statistics, the others' do not: ``steps.make_train_step``)."""
  schedule = plan.optimizer.kfac_schedule
  cuts = set(events)
  refresh = ({s for s in range(first + 1, last + 1) if schedule.stats_due(s - 1)}
             if schedule else set())
  cuts |= refresh | {s - 1 for s in refresh if s - 1 > first}
  out, a = [], first
  for b in sorted(cuts):
    out.append((a, b, (b in refresh and b - a == 1) if schedule else None))
    a = b
  return out


def train_population(plans: list[plan_lib.Plan], workdirs: list[str]) -> list[dict]:
  """Trains the runs of ``plans`` (equal ``shape_key``) together, each in its workdir, and
  returns their summaries in order (see the module docstring). Raises ValueError (one line) for
  plans that cannot train together or a workdir that is busy or holds another config, and
  ``train.Interrupted`` for Ctrl-C or SIGTERM."""
  started = time.time()
  times = collections.Counter()
  _check(plans, workdirs)
  if alone(plans[0]):   # trained as separate runs (``shape_key``: the same config)
    with contextlib.redirect_stdout(io.StringIO()):   # the caller says what ran
      return [train.train(p, w) for p, w in zip(plans, workdirs)]
  members = [_Member(p, w) for p, w in zip(plans, workdirs)]
  for m in members:
    m.summary = train.ended_run(m.plan, m.workdir, m.ckpts)
  active = [m for m in members if m.summary is None]
  if active:
    with _timed(times, "setup"):
      for m in active:
        m.plan = dataclasses.replace(m.plan, progress=False)   # one line per population
        m.run = train.build(m.plan, initialise=False)
    with contextlib.ExitStack() as stack:
      for m in active:
        stack.enter_context(train.owned(m.workdir))
      _train(active, started, times)
  return [m.summary for m in members]


@contextlib.contextmanager
def _timed(times: collections.Counter, what: str):
  """Adds the block's wall time to ``times[what]``: where a population's time goes (the
  ``population`` entry of each member's summary)."""
  start = time.perf_counter()
  try:
    yield
  finally:
    times[what] += time.perf_counter() - start


def _train(members: list[_Member], started: float, times: collections.Counter) -> None:
  """Opens every member's workdir, trains the population and writes the summaries."""
  with _timed(times, "setup"):
    states = _open(members)
  members = [m for m in members if m.opened is not None]
  if not members:
    return
  program = _program(members[0].plan, members[0].run)
  values = _traced_values([m.plan for m in members])
  if states is None:
    with _timed(times, "initialisation"):
      initial = program.init(values)
      for k, m in enumerate(members):
        if m.opened.start == 0:
          m.opened = m.opened._replace(state=_member_state(initial, k))
      states = _stack([m.opened.state for m in members])
  num_steps = members[0].run.num_steps
  try:
    first = min(m.opened.start for m in members)
    if first < num_steps:
      _loop(program, members, values, states, first, num_steps, times)
  finally:
    for m in members:
      m.opened.rec.close()
  wall = time.time() - started
  seconds = {k: round(v, 3) for k, v in sorted(times.items())}
  for k, m in enumerate(members):
    m.summary = train.close_run(m.plan, m.run, m.opened, m.diverged, m.ckpts, wall,
                                population={"members": len(members), "index": k,
                                            "seconds": seconds})


def _open(members: list[_Member]):
  """Opens each member's workdir (``train.open_run``), restoring its checkpoint; reports those
  that ended meanwhile. Returns the members' states stacked, or None when some start afresh
  (their initialisation is the caller's)."""
  plan, run = members[0].plan, members[0].run
  # Checkpoints are restored onto the state's shapes; only members that start afresh need the
  # initialisation (compiled once per shape and size).
  template = jax.tree.map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      jax.eval_shape(functools.partial(train.initial_state, run.objective.model, run.tx,
                                       train.example_input(run.datasets), plan.seed)),
      run.state_sharding)
  for m in members:
    m.run = m.run._replace(state=template)
    m.opened = train.open_run(m.plan, m.run, m.workdir, m.ckpts)
  for m in members:
    if m.opened is None:   # it ended while the population was being built
      m.summary = wd.read_json(os.path.join(m.workdir, wd.SUMMARY_FILE))
  opened = [m.opened for m in members if m.opened is not None]
  if not opened or any(o.start == 0 for o in opened):
    return None
  return _stack([o.state for o in opened])


def _loop(program: _Program, members: list[_Member], values: dict, states, first: int,
          num_steps: int, times: collections.Counter) -> None:
  """Trains every member from ``first`` to ``num_steps``, logging, evaluating, measuring and
  saving each as its separate run does (``train._loop``'s schedule)."""
  plan = members[0].plan
  with _timed(times, "setup"):
    d = _data(members)
  starts = np.asarray([m.opened.start for m in members], np.int32)
  stops = np.full(len(members), num_steps, np.int32)
  orders = [m.run.datasets.train.train_indices(plan.batch_size, m.plan.data.seed, first)
            for m in members]
  events = set(_events(plan, first, num_steps))
  window_start, window_time, done = first, time.time(), first
  try:
    for a, b, kfac_due in _stretches(plan, first, num_steps, sorted(events)):
      with _timed(times, "steps"):
        indices = np.stack([np.stack([next(o) for o in orders]) for _ in range(a, b)])
        states, metrics = program.stretch(
            states, values, d.tables, indices, np.arange(a + 1, b + 1, dtype=np.int32), starts,
            stops, kfac_due=kfac_due)
        metrics = jax.device_get(metrics)
      done = b
      for k, m in enumerate(members):
        if m.diverged is None and starts[k] < b:
          m.window.append({name: v[:, k] for name, v in metrics.items()})
      if b not in events:
        continue
      _record(program, members, states, d, b, num_steps, window_start, window_time, times)
      for k, m in enumerate(members):
        if m.diverged is not None:
          stops[k] = min(stops[k], b)
      window_start, window_time = b, time.time()
  except KeyboardInterrupt:
    for m in members:
      m.ckpts.wait()
    saved = [m.ckpts.steps() for m in members]
    common = min(s[-1] if s else 0 for s in saved)
    raise train.Interrupted(done, common or None) from None
  finally:
    # Interrupted or not, finish the checkpoints being written, so that a rerun resumes.
    with _timed(times, "checkpoints"):
      for m in members:
        m.ckpts.wait()


def _record(program: _Program, members: list[_Member], states, d: _Data, step: int,
            num_steps: int, window_start: int, window_time: float,
            times: collections.Counter) -> None:
  """At a logged step: each live member's record (its window's means, evaluation, measures),
  its timing and, when due, its checkpoint — or its divergence."""
  plan = members[0].plan
  last = step == num_steps
  elapsed = time.time() - window_time
  is_eval = step % plan.eval_every == 0 or last
  is_ckpt = step % plan.checkpoint_every == 0 or last
  due = plan.measures.due(step, last)
  if is_eval:
    with _timed(times, "evaluation"):
      evaluated = _evaluate(program, states, d)
  for k, m in enumerate(members):
    if m.diverged is not None or not m.window:
      continue
    window = {name: np.concatenate([w[name] for w in m.window]) for name in m.window[0]}
    m.window = []
    bad = np.flatnonzero(~np.isfinite(window["train_loss"]))
    if bad.size:
      m.diverged = window_start + int(bad[0]) + 1
      continue
    steps_done = len(window["train_loss"])
    record = {"step": step, "learning_rate": float(m.run.schedule(step - 1)),
              **{name: float(np.mean(v)) for name, v in window.items()}}
    if is_eval:
      record.update(evaluated[k])
    state = _member_state(states, k)
    measured = {}
    if due:
      with _timed(times, "measures"):
        measured = evaluators.run(
            [x.name for x in due], {x.name: x.settings for x in due}, program.objective,
            state.params, state.batch_stats, d.measured[k], bn_mode=plan.measures.bn_mode,
            seed=plan.measures.seed, num_classes=m.run.datasets.num_classes)
    record.update(evaluators.scalars(measured))
    with _timed(times, "logs"):
      m.opened.rec.record(step, record, {"step": step, "step_time_s": elapsed / steps_done,
                                         "examples_per_second":
                                             plan.batch_size * steps_done / elapsed}, measured)
    if is_ckpt:
      with _timed(times, "checkpoints"):
        m.ckpts.save(step, state, {"config": m.plan.config, **m.opened.rec.meta()})
