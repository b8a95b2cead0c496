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
