"""Sweeps: the training runs of a study described as data, run resumably here or on a cluster.

usage: python -m nonuniform_jax.sweep --config configs/sweeps/NAME.py[:VARIANT] --workdir DIR
           [--workers N] [--emit slurm|tpu_vm] [--config.KEY=VALUE ...]

A sweep config (``configs/sweeps/NAME.py``, ``get_config(variant)``, an ml_collections
ConfigDict) holds:

  name            the sweep's name
  base            the training config every member starts from, 'configs/FILE.py[:VARIANT]'
                  (relative to the repository root or the current directory)
  overrides       dotted keys -> values set in every member (a ConfigDict made with
                  allow_dotted_keys=True, or a dict); a dict value replaces the whole group
                  ('model': {'name': 'cnn', 'channels': (16, 32)})
  one_at_a_time   axes, each varied alone around the base
  grids           tuples of axes; each grid is the product of its axes
  seeds           replicates: every setting runs once per seed (default (0,))
  seed_key        the key the seeds set (default 'seed'; 'data_seed' redraws the data only)
  criterion       the analysis's training criterion (default {'train_accuracy': 0.99})
  include_base    whether the base itself is a member (default True)
  population_cap  the most members trained in one population (default 32)

An axis is a dict of dotted keys to equal-length tuples, read in step: {'batch_size': (64, 256)}
is two settings, {'optimizer.name': ('sam', 'sam'), 'sam.rho': (0.05, 0.1)} two settings that
each set both keys. A key must exist in the base config, except the arguments of ``model`` and
of ``measures.settings.NAME``, which plan.read checks. ``--config.train.KEY=VALUE`` changes the
shared config of every member (``train``: the base with ``overrides``); ``--config.seeds``,
``--config.criterion.train_accuracy`` and ``--config.population_cap`` change the others.

Members, in order: the base (``include_base``), each one-at-a-time point, each grid point —
every setting once (a point whose config equals an earlier one's is dropped) — each run once
per seed. Member i is named ``{i:04d}-{hash}``, the hash the first 8 hex digits of the SHA-256
of its overrides (as sorted JSON: the keys it sets beyond the shared config, and its seed), and
trains in ``DIR/members/NAME``. ``DIR/sweep.json`` lists them in the layout that
``nonuniform_jax.analysis.load_table`` reads, with the value of every varied key for every
member (``hyperparameters``).

Every member's config is read with ``plan.read`` before anything runs (a bad one is refused in
one line naming it), and a member's workdir holding another config is refused too. Members are
grouped into populations by ``population.shape_key`` (at most ``population_cap`` each, split
evenly) and each population is trained by ``population.train_population``. Finished members
(summary ``completed`` or ``diverged``) are skipped and interrupted ones resume where their
checkpoints left off, so the same command continues a sweep. One line is printed per population
trained and a final one with the counts.

``--workers N`` runs the populations in N local processes, each this command with
``--shard I/N``: populations are given to shards by a fixed rule (largest first, each to the
least loaded shard, by members × gradient evaluations × examples), so no two shards train the
same member (and each member's workdir lock would refuse a second trainer anyway). The workers
run in sessions of their own: Ctrl-C or SIGTERM reaches each once, through this command, and
each finishes the checkpoint it is writing; a command killed outright (SIGKILL) leaves them to
finish their shards.
``--emit slurm`` writes ``DIR/sweep.sbatch``, a job array with one task per shard (``--workers
N``) or per population, each running this command with its ``--shard``; ``--emit tpu_vm``
writes ``DIR/sweep_tpu_vm.sh``, one ``launch/tpu_vm.sh`` per shard, each on its own VM, all at
once. The members are the same in every mode: the shards check DIR/sweep.json, which the
command without ``--shard`` writes.

Exit status: 0 every member of the command's share finished (completed or diverged: a diverged
member is a result, which the analysis excludes); 1 some did not (a population failed, or
another process holds a member): the final line counts them and the same command retries
them; 2 bad input, in one line, nothing written; 75 disk full; 130 interrupted (the same
command resumes).
"""

import dataclasses
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

from nonuniform_jax import cli  # first: it quiets TensorFlow before anything imports it

from absl import flags  # pylint: disable=g-bad-import-order,wrong-import-position
from etils import epath  # pylint: disable=g-bad-import-order,wrong-import-position

# pylint: disable=g-bad-import-order,wrong-import-position
from nonuniform_jax import parallel, sweep_config, workdir as wd

USAGE = ("usage: python -m nonuniform_jax.sweep --config configs/sweeps/NAME.py[:VARIANT] "
         "--workdir DIR [--workers N] [--emit slurm|tpu_vm] [--config.KEY=VALUE ...]")
ROOT = sweep_config.ROOT
SBATCH_FILE = "sweep.sbatch"
TPU_VM_FILE = "sweep_tpu_vm.sh"
EMITS = ("slurm", "tpu_vm")
EXIT_UNFINISHED = 1
WORKER_ENV = "NONUNIFORM_JAX_SWEEP_WORKER"   # set by --workers in the processes it starts
ENDED = ("completed", "diverged")


def populations(plans, cap: int) -> list[list[int]]:
  """Member indices grouped by ``population.shape_key`` (in order of first appearance), each
  group split evenly into parts of at most ``cap``."""
  from nonuniform_jax import population  # pylint: disable=g-import-not-at-top
  groups = {}
  for i, plan in enumerate(plans):
    groups.setdefault(population.shape_key(plan), []).append(i)
  out = []
  for group in groups.values():
    parts = math.ceil(len(group) / cap)
    size, extra = divmod(len(group), parts)
    start = 0
    for p in range(parts):
      end = start + size + (p < extra)
      out.append(group[start:end])
      start = end
  return out


def cost(plan) -> float:
  """A member's training work, for balancing shards: gradient evaluations × examples."""
  examples = (plan.num_steps * plan.batch_size if plan.num_steps > 0 else
              plan.num_epochs * max(plan.data.num_train_examples, 1))
  return plan.optimizer.passes * examples


def partition(costs: list[float], num_shards: int) -> list[list[int]]:
  """Population indices of each shard: the costliest first (ties: the lower index), each to the
  least loaded shard (ties: the lower shard). Every population in exactly one shard."""
  loads, shards = [0.0] * num_shards, [[] for _ in range(num_shards)]
  for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
    s = min(range(num_shards), key=lambda s: (loads[s], s))
    shards[s].append(j)
    loads[s] += costs[j]
  return [sorted(s) for s in shards]


# --- the command line ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Args:
  spec: str                     # the sweep config, path[:variant], as given
  sweep: sweep_config.Sweep
  workdir: str
  workers: int | None
  emit: str | None
  shard: tuple[int, int] | None
  overrides: tuple              # the --config.KEY=VALUE arguments, as given


def _split_config(argv) -> tuple[str | None, list[str]]:
  """The --config value, and argv without it."""
  rest, spec, i = [], None, 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      spec, i = argv[i + 1], i + 1
    else:
      rest.append(arg)
    i += 1
  return spec, rest


def _config_overrides(argv) -> tuple:
  """The --config.KEY=VALUE arguments (a value given as the next word joined to its key)."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        arg, i = f"{arg}={argv[i + 1]}", i + 1
      out.append(arg)
    i += 1
  return tuple(out)


def parse(argv) -> Args:
  """The command line; ``--help`` prints the module docstring and exits 0, bad input ends the
  process with one line and status 2."""
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    print(__doc__.strip())
    sys.exit(cli.EXIT_OK)
  spec, rest = _split_config(list(argv[1:]))
  flag_values = flags.FlagValues()
  f = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The sweep's directory.", **f)
  flags.DEFINE_integer("workers", None, "Local worker processes (or, with --emit, shards).",
                       **f)
  flags.DEFINE_enum("emit", None, EMITS, "Write a cluster's scripts instead of training.", **f)
  flags.DEFINE_string("shard", None, "I/N: run shard I of N (what workers and clusters run).",
                      **f)
  others = [a for a in rest if not a.startswith("--config.")]
  try:
    remaining = flag_values(["sweep", *others])
  except flags.Error as e:
    cli.fail(f"{e}; {USAGE}")
  if len(remaining) > 1:
    cli.fail(f"unexpected arguments {remaining[1:]}; {USAGE}")
  missing = [n for n, v in (("config", spec), ("workdir", flag_values.workdir)) if not v]
  if missing:
    cli.fail(f"missing --{' and --'.join(missing)}; {USAGE}")
  workers, shard = flag_values.workers, None
  if workers is not None and workers < 1:
    cli.fail(f"--workers must be >= 1, got {workers}")
  if flag_values.shard is not None:
    try:
      index, count = (int(x) for x in flag_values.shard.split("/"))
    except ValueError:
      index = count = -1
    if not 0 <= index < count:
      cli.fail(f"--shard {flag_values.shard!r} must be I/N with 0 <= I < N")
    if workers is not None or flag_values.emit:
      cli.fail("--shard runs one shard: it takes no --workers or --emit")
    shard = (index, count)
  configs = _config_overrides(rest)
  try:
    sweep = sweep_config.read(spec, configs)
  except ValueError as e:
    cli.fail(e)
  return Args(spec, sweep, flag_values.workdir, workers, flag_values.emit, shard, configs)


def command(argv) -> int:
  """The whole command for ``argv`` (``argv[0]`` is the program). Returns 0 or 1 (module
  docstring); the other statuses end the process through ``nonuniform_jax.cli``."""
  args = parse(argv)
  cli.quiet_logs()
  # A worker of --workers leaves the line saying how to resume to its parent, which says it once.
  worker = args.shard is not None and os.environ.get(WORKER_ENV) == "1"
  return cli.guarded(lambda: _command(args, time.time()), args.workdir,
                     say_interrupted=not worker)


def _command(args: Args, started: float) -> int:
  from nonuniform_jax import plan as plan_lib, train  # pylint: disable=g-import-not-at-top
  from nonuniform_jax.analysis import table  # pylint: disable=g-import-not-at-top
  directory = args.workdir
  wd.check_writable(directory)
  if args.shard is None:
    wd.check_free(directory)
  members = sweep_config.expand(args.sweep)
  rec = sweep_config.record(args.sweep, members)
  path = _join(directory, table.SWEEP_FILE)
  existing = wd.read_json(path) if _exists(path) else None
  if existing is not None and _identity(existing) != _identity(rec):
    raise ValueError(f"workdir {directory!r} holds another sweep ({_difference(existing, rec)}); "
                     "use another --workdir")
  if args.shard is not None and existing is None:
    raise ValueError(f"workdir {directory!r} holds no {table.SWEEP_FILE}: run the same command "
                     "without --shard (or with --emit) first")
  plans = []
  for m in members:   # every check before anything runs or is written
    shown = ", ".join(f"{k}={v!r}"
                      for k, v in sweep_config.flat_overrides(m.overrides).items())
    try:
      plans.append(plan_lib.read(m.config))
      wd.prepare(_join(directory, m.workdir), plans[-1].config, plans[-1].overwrite,
                 write=False)
    except ValueError as e:
      raise ValueError(f"member {m.name} ({shown}): {e}") from None
  pops = populations(plans, args.sweep.population_cap)
  costs = [sum(cost(plans[i]) for i in pop) for pop in pops]
  if args.shard is not None:
    index, count = args.shard
    mine = partition(costs, count)[index]
    counts = _run(args, members, plans, pops, mine)
    print(_final_line(args, counts, time.time() - started, f" (shard {index}/{count})"))
    return EXIT_UNFINISHED if counts["failed"] or counts["busy"] else cli.EXIT_OK
  with train.owned(directory):
    if existing != rec:
      wd.write_json(path, rec)
    if args.emit:
      return _emit(args, members, pops, costs, path)
    if args.workers and args.workers > 1:
      counts = _run_workers(args, members, partition(costs, args.workers))
    else:
      counts = _run(args, members, plans, pops, range(len(pops)))
  print(_final_line(args, counts, time.time() - started, ""))
  print(f"sweep.json: {path}")
  print(f"plot: python -m nonuniform_jax.plot --logdir {shlex.quote(directory)}")
  return EXIT_UNFINISHED if counts["failed"] or counts["busy"] else cli.EXIT_OK


def _join(directory: str, *parts: str) -> str:
  return "/".join([directory.rstrip("/"), *parts]) if "://" in directory else os.path.join(
      directory, *parts)


def _exists(path: str) -> bool:
  return epath.Path(path).exists()


def _identity(rec: dict) -> dict:
  """What makes a sweep the same: its members and what they train (not its criterion)."""
  return {k: v for k, v in rec.items() if k != "criterion"}


def _difference(old: dict, new: dict) -> str:
  if old.get("base_config") != new.get("base_config"):
    return f"base config {old.get('base_config')!r}, not {new.get('base_config')!r}"
  a, b = old.get("overrides") or {}, new.get("overrides") or {}
  changed = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k)]
  if changed:
    return "shared settings " + "; ".join(changed[:3]) + ("; ..." if len(changed) > 3 else "")
  names = [m["name"] for m in old.get("members", [])], [m["name"] for m in new["members"]]
  if names[0] != names[1]:
    first = next((a for a, b in zip(*names) if a != b), None)
    return (f"{len(names[0])} members, not {len(names[1])}" if first is None else
            f"member {first} differs")
  return f"name {old.get('name')!r}, not {new.get('name')!r}"


def _ended(directory: str, member: sweep_config.Member) -> str | None:
  """'completed' or 'diverged' if the member's summary says so, else None."""
  path = _join(directory, member.workdir, wd.SUMMARY_FILE)
  if not _exists(path):
    return None
  status = wd.read_json(path).get("status")
  return status if status in ENDED else None


def _run(args: Args, members, plans, pops, chosen) -> dict:
  """Trains the populations ``chosen`` (indices into ``pops``) in turn; the counts."""
  from nonuniform_jax import population, train  # pylint: disable=g-import-not-at-top
  counts = dict.fromkeys(("members", "trained", "diverged", "skipped", "failed", "busy"), 0)
  directory = args.workdir
  for j in chosen:
    pop = pops[j]
    counts["members"] += len(pop)
    todo = []
    for i in pop:
      workdir = _join(directory, members[i].workdir)
      if _ended(directory, members[i]):
        counts["skipped"] += 1
      elif wd.lock_holder(workdir):
        counts["busy"] += 1
      else:
        todo.append(i)
    if not todo:
      continue
    started, line = time.time(), f"population {j + 1}/{len(pops)} {_names(members, pop)}"
    try:
      summaries = population.train_population(
          [plans[i] for i in todo], [_join(directory, members[i].workdir) for i in todo])
    except (KeyboardInterrupt, train.Interrupted):
      print(f"{line}: interrupted", flush=True)
      raise KeyboardInterrupt from None
    except Exception as e:  # pylint: disable=broad-except
      if cli.is_disk_full(e):
        raise
      counts["failed"] += len(todo)
      why = (str(e).strip().splitlines() or [""])[-1]
      print(f"{line}: {len(todo)} failed ({type(e).__name__}: {why})", flush=True)
      continue
    statuses = [s.get("status") for s in summaries]
    diverged = statuses.count("diverged")
    trained = statuses.count("completed") + diverged
    counts["trained"] += trained
    counts["diverged"] += diverged
    counts["failed"] += len(todo) - trained
    parts = [f"{statuses.count('completed')} completed"] + (
        [f"{diverged} diverged"] if diverged else []) + (
        [f"{len(todo) - trained} failed"] if len(todo) > trained else []) + (
        [f"{len(pop) - len(todo)} skipped"] if len(pop) > len(todo) else [])
    print(f"{line}: {', '.join(parts)} in {time.time() - started:.1f} s", flush=True)
  return counts


def _names(members, pop) -> str:
  if len(pop) == 1:
    return f"({members[pop[0]].name})"
  return f"({len(pop)} members, {members[pop[0]].name} .. {members[pop[-1]].name})"


def _final_line(args: Args, counts: dict, seconds: float, where: str) -> str:
  diverged = f" ({counts['diverged']} diverged)" if counts["diverged"] else ""
  busy = (f", {counts['busy']} held by another process" if counts["busy"] else "")
  return (f"sweep {args.sweep.name}{where}: {counts['members']} members: {counts['trained']} "
          f"trained{diverged}, {counts['skipped']} skipped (finished before), "
          f"{counts['failed']} failed{busy}; {_duration(seconds)}")


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  minutes = seconds / 60
  return f"{minutes:.0f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _sweep_words(args: Args) -> list[str]:
  """This command's arguments, less --workers, --emit and --shard."""
  return [f"--config={args.spec}", f"--workdir={args.workdir}", *args.overrides]


def _run_workers(args: Args, members, shards) -> dict:
  """Runs each non-empty shard in its own process (this command with --shard I/N); the counts,
  from the members' summaries before and after. An interruption is passed on to every worker
  (SIGTERM: each finishes the checkpoint it is writing), and then ends this command."""
  before = [_ended(args.workdir, m) for m in members]
  processes = []
  try:
    for i, shard in enumerate(shards):
      if shard:
        with parallel.signals_held():   # no worker started that the stop below does not know
          processes.append(subprocess.Popen(
              [sys.executable, "-m", "nonuniform_jax.sweep",
               *_sweep_words(args), f"--shard={i}/{len(shards)}"], start_new_session=True,
              env={**os.environ, WORKER_ENV: "1"}))
    statuses = [p.wait() for p in processes]
  except KeyboardInterrupt:
    for p in processes:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    for p in processes:
      p.wait()
    raise
  if cli.EXIT_INTERRUPTED in statuses or -signal.SIGTERM in statuses:
    raise KeyboardInterrupt
  if cli.EXIT_DISK_FULL in statuses:
    cli.fail(f"a worker found no space left on the device of workdir {args.workdir!r}; what was "
             "saved is intact: free some space and run the same command to resume",
             cli.EXIT_DISK_FULL)
  after = [_ended(args.workdir, m) for m in members]
  ended = [a is not None for a in after]
  return {"members": len(members), "skipped": sum(b is not None for b in before),
          "trained": sum(a and b is None for a, b in zip(ended, before)),
          "diverged": sum(a == "diverged" and b is None for a, b in zip(after, before)),
          "failed": sum(not a for a in ended), "busy": 0}


# --- scripts for clusters -----------------------------------------------------------------

def _emit(args: Args, members, pops, costs, sweep_json: str) -> int:
  count = args.workers or len(pops)
  shards = partition(costs, count)
  unit = "shard" if args.workers else "population"
  spec = _in_repository(args.spec)
  if args.emit == "tpu_vm" and os.path.isabs(spec.partition(":")[0]):
    raise ValueError(f"--emit tpu_vm copies the repository to the VMs: the sweep config "
                     f"{args.spec!r} must be inside it ({ROOT})")
  remote = "://" in args.workdir
  directory = args.workdir if remote else os.path.abspath(args.workdir)
  shown = dataclasses.replace(args, spec=spec, workdir=directory)
  text = (_slurm_script if args.emit == "slurm" else _tpu_vm_script)(shown, shards, unit,
                                                                    len(members))
  path = _join(args.workdir, SBATCH_FILE if args.emit == "slurm" else TPU_VM_FILE)
  wd.write_text(path, text)
  if not remote:
    os.chmod(path, 0o755)
  print(f"sweep.json: {sweep_json} ({len(members)} members in {len(pops)} populations)")
  if args.emit == "slurm":
    print(f"wrote {path}: a job array of {count} tasks, one per {unit}; submit it with: "
          f"sbatch {shlex.quote(path)}")
  else:
    note = ("" if remote else "; the VMs are deleted after their shard, so give a bucket "
            "(gs://...) as --workdir for their results to outlive them")
    print(f"wrote {path}: {count} VMs, one per {unit}, all at once; run it with: "
          f"ZONE=... bash {shlex.quote(path)}{note}")
  print(f"then: python -m nonuniform_jax.plot --logdir {shlex.quote(args.workdir)}")
  return cli.EXIT_OK


def _in_repository(spec: str) -> str:
  """The sweep config's path relative to the repository root when it lies inside it (the
  scripts run from the root), else absolute."""
  path, sep, variant = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_absolute() and not file.exists():
    file = ROOT / path
  file = file.resolve()
  try:
    path = str(file.relative_to(ROOT))
  except ValueError:
    path = str(file)
  return path + sep + variant


def _quoted(words) -> str:
  return " ".join(shlex.quote(w) for w in words)


def _header(args: Args, shards, unit: str, num_members: int) -> list[str]:
  sizes = " ".join(str(len(s)) for s in shards)
  return [f"# Sweep {args.sweep.name}: {num_members} members, {len(shards)} {unit}s "
          f"(populations per shard: {sizes}).",
          f"# Written by: python -m nonuniform_jax.sweep {_quoted(_sweep_words(args))} "
          f"--emit {args.emit}",
          "# Each shard runs the same sweep command with its --shard; a shard that failed or was "
          "stopped",
          "# resumes where it was when run again (finished members are skipped)."]


def _slurm_script(args: Args, shards, unit: str, num_members: int) -> str:
  script = shlex.quote(_join(args.workdir, SBATCH_FILE))
  log = ([f"#SBATCH --output={args.workdir}/slurm-%A_%a.out"]
         if "://" not in args.workdir else [])
  command = ('"${PYTHON:-.venv/bin/python}" -m nonuniform_jax.sweep '
             f'{_quoted(_sweep_words(args))} --shard="$SLURM_ARRAY_TASK_ID/{len(shards)}"')
  return "\n".join([
      "#!/usr/bin/env bash",
      *_header(args, shards, unit, num_members),
      f"#   sbatch {script}            # every task",
      f"#   sbatch --array=I {script}  # task I again (I: a number, a list 1,4 or a range 2-5)",
      "# Install once on the shared filesystem first (as for launch/slurm_gpu.sbatch):",
      "#   python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt "
      "-c constraints.txt -e . 'jax[cuda12]==0.10.2'",
      "# PYTHON=... runs another interpreter than the repository's .venv/bin/python.",
      f"#SBATCH --job-name=sweep-{args.sweep.name}",
      f"#SBATCH --array=0-{len(shards) - 1}",
      "#SBATCH --ntasks=1",
      "#SBATCH --gpus=1",
      "#SBATCH --cpus-per-task=8",
      "#SBATCH --time=24:00:00",
      *log,
      "set -euo pipefail",
      f"cd {shlex.quote(str(ROOT))}",
      command,
      ""])


def _tpu_vm_script(args: Args, shards, unit: str, num_members: int) -> str:
  lines = [
      "#!/usr/bin/env bash",
      *_header(args, shards, unit, num_members),
      "# One single-host Cloud TPU VM per shard, all at once: launch/tpu_vm.sh creates it, copies",
      "# and installs the repository, runs the shard and deletes the VM. Each shard's output goes",
      "# to $LOGS/shard-I.log. Environment: ZONE (required), ACCELERATOR (default v4-8), PREFIX",
      f"# (VM names, default nu-{args.sweep.name}), SHARDS (the shards to run, default all), "
      "LOGS,",
      "# and launch/tpu_vm.sh's own: TFDS_DATA_DIR, RUNTIME, REPO, KEEP, DRY_RUN.",
      f"#   ZONE=us-central2-b TFDS_DATA_DIR=gs://my-bucket/tfds bash {TPU_VM_FILE}",
      f"#   ZONE=us-central2-b SHARDS='I J' bash {TPU_VM_FILE}   # shards I and J again",
      "set -euo pipefail",
      f"cd {shlex.quote(str(ROOT))}",
      ': "${ZONE:?set ZONE, the zone of the TPU VMs (e.g. ZONE=us-central2-b)}"',
      "ACCELERATOR=${ACCELERATOR:-v4-8}",
      f"PREFIX=${{PREFIX:-nu-{args.sweep.name.replace('_', '-')}}}",
      f"LOGS=${{LOGS:-${{TMPDIR:-/tmp}}/nu-sweep-{args.sweep.name}}}",
      f"SHARDS=${{SHARDS:-{' '.join(str(i) for i in range(len(shards)))}}}",
      'mkdir -p "$LOGS"',
      "shard() {   # shard I COMMAND...: in the background, if I is in $SHARDS",
      '  local i=$1',
      "  shift",
      '  case " $SHARDS " in *" $i "*) ;; *) return 0 ;; esac',
      '  "$@" > "$LOGS/shard-$i.log" 2>&1 &',
      "  pids+=($!)",
      "}",
      "pids=()"]
  for i in range(len(shards)):
    lines.append(f'shard {i} env MODULE=nonuniform_jax.sweep launch/tpu_vm.sh "$PREFIX-{i}" '
                 f'"$ZONE" "$ACCELERATOR" {_quoted([args.spec, args.workdir])} '
                 f'{_quoted([*args.overrides, f"--shard={i}/{len(shards)}"])}')
  lines += [
      'echo "${#pids[@]} shards started; logs in $LOGS"',
      "failed=0",
      'for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done',
      'if [ "$failed" -gt 0 ]; then',
      '  echo "$failed shards failed: see $LOGS; run the failed shards again with SHARDS=..." >&2',
      "  exit 1",
      "fi",
      ""]
  return "\n".join(lines)


def run():
  cli.as_program()
  sys.exit(command(sys.argv))


if __name__ == "__main__":
  run()
