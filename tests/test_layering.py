"""No module of the package (or of the benchmarks) reaches into another module's private names.

A name with a leading underscore is its module's own business: importing it (``from X import
_y``, ``import X._y``) or reading it off an imported module (``X._y``) ties two modules to a
detail that one of them should be free to change. Parsed with ``ast``, nothing is imported.
First-party modules only (``nonuniform_jax``, ``benchmarks``); tests may look inside.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIRST_PARTY = ("nonuniform_jax", "benchmarks")
# (file relative to the root, the private name as written) -> why it is allowed. Keep it empty.
EXEMPT: dict[tuple[str, str], str] = {}


def _sources():
  return sorted([*ROOT.glob("nonuniform_jax/**/*.py"), *ROOT.glob("benchmarks/*.py")])


def _private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _first_party(module: str) -> bool:
  return module.split(".")[0] in FIRST_PARTY


def private_imports(source: str) -> list[tuple[int, str]]:
  """(line, what) for every private name of another first-party module that ``source`` imports
  or reads off a module (or object) it imported."""
  tree = ast.parse(source)
  found, imported = [], set()   # names bound by first-party imports
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level == 0 and not _first_party(module):
        continue
      for alias in node.names:
        if any(_private(part) for part in module.split(".")) or _private(alias.name):
          found.append((node.lineno, f"from {'.' * node.level}{module} import {alias.name}"))
        imported.add(alias.asname or alias.name)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if not _first_party(alias.name):
          continue
        parts = alias.name.split(".")
        if any(_private(part) for part in parts):
          found.append((node.lineno, f"import {alias.name}"))
        # ``import a.b.c`` binds a, through which a.b and a.b.c are read.
        imported.update([alias.asname] if alias.asname else
                        (".".join(parts[:i]) for i in range(1, len(parts) + 1)))
    elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
          and ast.unparse(node.value.func) == "importlib.import_module"):
      imported.update(t.id for t in node.targets if isinstance(t, ast.Name))
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and _private(node.attr):
      base = ast.unparse(node.value)
      if base in imported:
        found.append((node.lineno, f"{base}.{node.attr}"))
  return sorted(found)


def test_the_check_sees_every_form():
  source = ("from nonuniform_jax.measures import _tree\n"
            "from nonuniform_jax.optim.kfac import _layer_params\n"
            "from . import _local\n"
            "import nonuniform_jax.measures._tree\n"
            "from nonuniform_jax.measures import hessian\n"
            "import nonuniform_jax.optim.kfac as kfac\n"
            "import importlib\n"
            "gn = importlib.import_module('nonuniform_jax.measures.trace_sigma')\n"
            "hessian._hvp(1)\n"
            "kfac._layer_params\n"
            "gn._fast_means\n"
            "nonuniform_jax.measures._tree.group_batches\n"
            # Not private, or not first-party, or not read off an imported module:
            "import os\n"
            "os._exit\n"
            "from jax import numpy as jnp\n"
            "kfac.Factors._fields\n"
            "self._cache\n"
            "hessian.__name__\n")
  assert [what for _, what in private_imports(source)] == [
      "from nonuniform_jax.measures import _tree",
      "from nonuniform_jax.optim.kfac import _layer_params",
      "from . import _local",
      "import nonuniform_jax.measures._tree",
      "hessian._hvp", "kfac._layer_params", "gn._fast_means",
      "nonuniform_jax.measures._tree"]


def test_no_module_uses_another_modules_private_names():
  offences = []
  for path in _sources():
    relative = str(path.relative_to(ROOT))
    for line, what in private_imports(path.read_text()):
      if (relative, what) not in EXEMPT:
        offences.append(f"{relative}:{line}: {what}")
  assert not offences, "private names used across modules:\n" + "\n".join(offences)


# ------------------------------------------------------------------ layers and import cycles

# docs/architecture.md's layers, top first: a module imports modules of its own layer or below.
LAYERS = [
    ("main", "measure", "plot", "sweep", "sweep_config", "cli"),
    ("train", "checkpoints", "recorder", "analysis", "experiments", "population"),
    ("plan",),
    ("steps", "evaluators"),
    ("objective", "measures"),
    ("optim",),
    ("models", "data"),
    ("checks", "workdir", "parallel", "per_example", "pytree", "capture"),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
  """'nonuniform_jax.measures.hessian' -> 'measures' (the first name below the package)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path) -> set[str]:
  """The first-party modules a source file imports (at any depth of its code)."""
  module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
  package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("nonuniform_jax"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if base.startswith("nonuniform_jax"):
        out.update(f"{base}.{a.name}" if f"{base}.{a.name}".replace(".", "/") and (
            ROOT / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").exists() or (
            ROOT / f"{base}.{a.name}".replace(".", "/")).is_dir() else base
                   for a in node.names)
  return out


def test_every_module_has_a_layer():
  units = {_unit(".".join(p.relative_to(ROOT).with_suffix("").parts))
           for p in ROOT.glob("nonuniform_jax/**/*.py")} - {"", "__init__"}
  assert units <= set(LAYER), sorted(units - set(LAYER))


def test_no_module_imports_upwards():
  upward = []
  for path in ROOT.glob("nonuniform_jax/**/*.py"):
    here = _unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
    if here in ("", "__init__"):
      continue
    for target in _imports(path):
      there = _unit(target)
      if there and there != here and LAYER[there] < LAYER[here]:
        upward.append(f"{path.relative_to(ROOT)} imports {target} "
                      f"(layer {LAYER[there]} above {LAYER[here]})")
  assert not upward, upward


def test_no_import_cycles_between_modules():
  graph = {}
  for path in ROOT.glob("nonuniform_jax/**/*.py"):
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    graph[module] = {t for t in _imports(path) if t != module}
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for target in sorted(graph.get(node, ())):
      if target not in graph or target.startswith(node + "."):
        continue   # a package importing its own submodules is how packages export
      if state.get(target) == "open":
        cycles.append(stack[stack.index(target):] + [target])
      elif target not in state:
        visit(target, stack + [target])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, cycles
