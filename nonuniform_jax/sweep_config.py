"""A sweep config read and expanded into its members: what ``python -m nonuniform_jax.sweep`` runs.

``read(spec, overrides)`` loads ``configs/sweeps/NAME.py[:VARIANT]`` (its fields are listed in
the sweep command's docstring) with the command line's ``--config.*`` arguments and builds the
shared training config: the base config, the sweep's overrides, then ``--config.train.*``.
``expand(sweep)`` gives the members in their fixed order, each with its name, overrides and
config; ``record(sweep, members)`` is ``sweep.json``, in the layout that
``nonuniform_jax.analysis.load_table`` reads. Nothing here trains, compiles or writes.
"""

import dataclasses
import difflib
import hashlib
import itertools
import json
import pathlib
import runpy

from absl import flags
import ml_collections
from ml_collections import config_flags

from nonuniform_jax import workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
MEMBERS_DIR = "members"
# The fields of a sweep config and their defaults (None: required).
FIELDS = {"name": None, "base": None, "overrides": {}, "one_at_a_time": (), "grids": (),
          "seeds": (0,), "seed_key": "seed", "criterion": {"train_accuracy": 0.99},
          "include_base": True, "population_cap": 32}
# What the command line may change besides the shared config (``train``).
SETTABLE = ("seeds", "seed_key", "criterion", "include_base", "population_cap")
# Groups whose keys are arguments that plan.read checks: an axis may set keys the base lacks.
OPEN_GROUPS = ("model.", "measures.settings.")


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep config, read. ``train``: the shared config of every member; ``shared``: what it
  changes in the base config, as dotted keys (a key the base has and it lacks: None)."""
  name: str
  base: str
  train: ml_collections.ConfigDict
  shared: dict
  one_at_a_time: tuple
  grids: tuple
  seeds: tuple
  seed_key: str
  criterion: dict
  include_base: bool
  population_cap: int


@dataclasses.dataclass(frozen=True)
class Member:
  index: int
  name: str
  overrides: dict               # dotted keys -> values beyond the shared config, and the seed
  config: ml_collections.ConfigDict

  @property
  def workdir(self) -> str:
    """Relative to the sweep's directory."""
    return f"{MEMBERS_DIR}/{self.name}"


def plain(value):
  """``value`` as JSON reads it back (tuples become lists, ConfigDicts dicts)."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def load_config(spec: str, what: str = "config"):
  """``get_config([variant])`` of ``path[:variant]``, a path relative to the current directory
  or the repository root. ValueError (one line) when the file is missing or raises."""
  path, _, variant = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_absolute() and not file.exists() and (ROOT / path).exists():
    file = ROOT / path
  if not file.is_file():
    raise ValueError(f"cannot load {what} {spec!r}: no such file (paths are relative to the "
                     "current directory or the repository root)")
  try:
    module = runpy.run_path(str(file))
    return module["get_config"](variant) if variant else module["get_config"]()
  except Exception as e:  # pylint: disable=broad-except
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise ValueError(f"cannot load {what} {spec!r}: {type(e).__name__}: "
                     f"{lines[-1] if lines else ''}") from None


def _did_you_mean(key: str, config) -> str:
  close = difflib.get_close_matches(key, list(wd.flatten(plain(config))), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def apply(config: ml_collections.ConfigDict, overrides: dict,
          where: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the dotted ``overrides`` set (a dict value replaces the whole
  group). ValueError, naming ``where``, for a key the config lacks or a value of another type."""
  out = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *path, last = dotted.split(".")
    node = out
    for part in path:
      if not isinstance(node.get(part), ml_collections.ConfigDict):
        raise ValueError(f"{where}: unknown setting {dotted!r}{_did_you_mean(dotted, out)}")
      node = node[part]
    if last not in node and not dotted.startswith(OPEN_GROUPS):
      raise ValueError(f"{where}: unknown setting {dotted!r}{_did_you_mean(dotted, out)}")
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    try:
      if isinstance(value, dict):
        node[last] = ml_collections.ConfigDict(value)
      else:
        node[last] = tuple(value) if isinstance(value, list) else value
    except TypeError as e:
      raise ValueError(f"{where}: {dotted}={value!r}: {e}") from None
  return out


def read(spec: str, overrides=()) -> Sweep:
  """The sweep config at ``spec`` (path[:variant]) with the command line's ``--config.*``
  arguments ``overrides``. ValueError (one line) for anything malformed or unknown."""
  return from_fields(spec, load_config(spec, "sweep config"), overrides)


def from_fields(spec: str, loaded, overrides=()) -> Sweep:
  """:func:`read` for a config already loaded (a ConfigDict or a dict of the fields)."""
  fields = loaded.to_dict() if isinstance(loaded, ml_collections.ConfigDict) else loaded
  if not isinstance(fields, dict):
    raise ValueError(f"sweep config {spec!r}: get_config() must return a ConfigDict, got "
                     f"{type(loaded).__name__}")
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise ValueError(f"sweep config {spec!r}: unknown field {unknown[0]!r}; its fields are "
                     f"{list(FIELDS)}")
  missing = [k for k, v in FIELDS.items() if v is None and not fields.get(k)]
  if missing:
    raise ValueError(f"sweep config {spec!r} has no {missing[0]!r}")
  fields = {**{k: v for k, v in FIELDS.items() if v is not None}, **fields}
  for arg in overrides:
    if not arg.startswith(tuple(f"--config.{k}" for k in (*SETTABLE, "train"))):
      raise ValueError(f"{arg.split('=')[0]}: the command line changes only "
                       f"{', '.join('--config.' + k for k in SETTABLE)} and every member's "
                       "settings, --config.train.KEY=VALUE; the members' axes are the sweep "
                       "config's")
  base = load_config(fields["base"], "base config")
  if not isinstance(base, ml_collections.ConfigDict):
    raise ValueError(f"base config {fields['base']!r} does not return a ConfigDict")
  train = apply(base, dict(fields["overrides"]), f"sweep config {spec!r}: overrides")
  train.progress = False   # presentation only: members draw no progress bars
  settable = ml_collections.ConfigDict({k: fields[k] for k in SETTABLE})
  settable.train = train
  c = _parse_overrides(settable, list(overrides))
  seeds = tuple(c.seeds)
  if not seeds or len(set(seeds)) != len(seeds) or not all(
      isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f"seeds {seeds!r} must be distinct integers, at least one")
  if not (isinstance(c.population_cap, int) and c.population_cap >= 1):
    raise ValueError(f"population_cap must be an integer >= 1, got {c.population_cap!r}")
  if set(c.criterion) != {"train_accuracy"} or not 0 <= c.criterion.train_accuracy <= 1:
    raise ValueError(f"criterion {c.criterion.to_dict()!r} must be {{'train_accuracy': A}} with "
                     "A in [0, 1]")
  base_flat, train_flat = wd.flatten(plain(base)), wd.flatten(plain(c.train))
  shared = {k: train_flat.get(k) for k in sorted(set(base_flat) | set(train_flat))
            if base_flat.get(k) != train_flat.get(k)}
  return Sweep(name=str(fields["name"]), base=fields["base"], train=c.train, shared=shared,
               one_at_a_time=tuple(fields["one_at_a_time"]), grids=tuple(fields["grids"]),
               seeds=seeds, seed_key=c.seed_key, criterion=c.criterion.to_dict(),
               include_base=bool(c.include_base), population_cap=c.population_cap)


def _parse_overrides(config: ml_collections.ConfigDict, argv: list[str]):
  """``config`` with the ``--config.KEY=VALUE`` arguments applied, typed as ml_collections
  types them."""
  flag_values, prefix = flags.FlagValues(), "--config."
  try:
    holder = config_flags.DEFINE_config_dict("config", config, flag_values=flag_values,
                                             sys_argv=["sweep", *argv])
    flag_values(["sweep", *argv], known_only=True)
  except (AttributeError, KeyError) as e:
    keys = [a.split("=")[0] for a in argv]
    bad = next((k for k in keys if _lacks(config, k[len(prefix):])), None)
    hint = (_did_you_mean(bad[len(prefix):], config).replace("'", "").replace(
        "mean ", "mean " + prefix) if bad else "")
    raise ValueError(f"unknown setting {bad or e}: the sweep config has no such key{hint}; "
                     "every member's settings are under --config.train.") from None
  except flags.Error as e:
    raise ValueError(str(e)) from None
  return holder.value


def _lacks(config, dotted: str) -> bool:
  for part in dotted.split("."):
    if not isinstance(config, ml_collections.ConfigDict) or part not in config:
      return True
    config = config[part]
  return False


def flat_overrides(overrides: dict) -> dict:
  """Dotted overrides with dict values (whole groups) spread into their dotted leaves."""
  out = {}
  for key, value in plain(overrides).items():
    out.update(wd.flatten(value, key + ".") if isinstance(value, dict) else {key: value})
  return out


def _points(axis, where: str) -> list[dict]:
  """An axis's settings: one dict of dotted overrides per position."""
  if not isinstance(axis, dict) or not axis or any(
      not isinstance(v, (tuple, list)) or not v for v in axis.values()):
    raise ValueError(f"{where}: an axis is a dict of dotted keys to non-empty tuples of values "
                     f"(read in step), got {axis!r}")
  lengths = {len(v) for v in axis.values()}
  if len(lengths) > 1:
    raise ValueError(f"{where}: the keys of one axis vary in step and need as many values each, "
                     f"got {({k: len(v) for k, v in axis.items()})}")
  return [{k: v[i] for k, v in axis.items()} for i in range(lengths.pop())]


def _settings(sweep: Sweep) -> list[tuple[str, dict]]:
  """(where, dotted overrides) of every setting, in the members' order, duplicates included."""
  out = [("the base", {})] if sweep.include_base else []
  for i, axis in enumerate(sweep.one_at_a_time):
    out += [(f"one_at_a_time[{i}]", p) for p in _points(axis, f"one_at_a_time[{i}]")]
  for g, grid in enumerate(sweep.grids):
    grid = (grid,) if isinstance(grid, dict) else grid
    axes = [_points(axis, f"grids[{g}][{a}]") for a, axis in enumerate(grid)]
    keys = [k for axis in grid for k in axis]
    if len(keys) != len(set(keys)):
      raise ValueError(f"grids[{g}]: a key is in two of its axes: {keys}")
    out += [(f"grids[{g}]", {k: v for point in product for k, v in point.items()})
            for product in itertools.product(*axes)]
  return out


def digest(overrides: dict) -> str:
  """The first 8 hex digits of the SHA-256 of ``overrides`` as sorted JSON."""
  text = json.dumps(plain(overrides), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def _lookup(tree: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return KeyError
    tree = tree[part]
  return tree


def expand(sweep: Sweep) -> list[Member]:
  """The sweep's members, in their fixed order (the sweep command's docstring). ValueError for
  an axis that is malformed, sets an unknown key or a value of the wrong type, or sets the seed
  key."""
  shared = plain(sweep.train)
  configs, seen = [], set()
  for where, point in _settings(sweep):
    if sweep.seed_key in point:
      raise ValueError(f"{where}: sets the seed key {sweep.seed_key!r}; replicates come from "
                       "'seeds'")
    config = apply(sweep.train, point, where)
    text = json.dumps(plain(config), sort_keys=True)
    if text in seen:
      continue
    seen.add(text)
    changed = {k: v for k, v in plain(point).items() if _lookup(shared, k) != v}
    configs.append((changed, config))
  if not configs:
    raise ValueError("the sweep has no members: give one_at_a_time or grids, or include_base")
  width = max(4, len(str(len(configs) * len(sweep.seeds) - 1)))
  members = []
  for changed, config in configs:
    for seed in sweep.seeds:
      overrides = {**changed, sweep.seed_key: seed}
      name = f"{len(members):0{width}d}-{digest(overrides)}"
      members.append(Member(len(members), name, overrides,
                            apply(config, {sweep.seed_key: seed}, f"member {name}")))
  return members


def varied_keys(members: list[Member]) -> list[str]:
  """Every dotted key that some member sets (a group replaced counts as its leaves), sorted."""
  return sorted({k for m in members for k in flat_overrides(m.overrides)})


def record(sweep: Sweep, members: list[Member]) -> dict:
  """``sweep.json``: what ``analysis.load_table`` reads (name, base config, criterion, members
  with workdir and the value of every varied key) and what makes each member (the shared
  overrides, the member's own, the seed key)."""
  keys = varied_keys(members)
  rows = []
  for m in members:
    flat = wd.flatten(plain(m.config))
    rows.append({"name": m.name, "workdir": m.workdir, "overrides": plain(m.overrides),
                 "hyperparameters": {k: flat.get(k) for k in keys}})
  return {"name": sweep.name, "base_config": sweep.base, "overrides": sweep.shared,
          "seed_key": sweep.seed_key, "criterion": dict(sweep.criterion),
          "hyperparameters": keys, "members": rows}
