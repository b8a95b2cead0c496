"""Every command the README, docs/ and the docstrings show runs as written (after the README's
set-up), at tiny scale through appended overrides: a documented command can no longer break
while the functions under it pass.

Commands of ``python -m nonuniform_jax.main`` / ``.measure`` / ``.sweep`` / ``.plot`` run in
this process through the same ``command(argv)`` that ``python -m`` runs (``tests/test_cli.py``
runs that wrapper itself), TFDS datasets under ``tfds.testing.mock_data``, sweeps at their
configs' ``tiny`` scale; Python blocks are executed; launch scripts run in
their dry-run or no-install modes. What cannot run here is listed in ``NOT_RUN`` with the reason,
and a command that is neither run nor listed fails the test.
"""

import ast
import contextlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted([*ROOT.glob("configs/*.py"), *ROOT.glob("configs/sweeps/*.py"),
                  *ROOT.glob("nonuniform_jax/**/*.py"), *ROOT.glob("benchmarks/*.py")])
PROGRAMS = ("python", ".venv/bin/python", "python3.11", "launch/", "sbatch", "tensorboard",
            "DRY_RUN=", "TFDS_DATA_DIR=", "JAX_COORDINATOR_ADDRESS=")
# Commands that are templates (placeholders in capitals) or cannot run here, with why.
NOT_RUN = {
    "python3.11 -m venv .venv": "the set-up: .ci/run runs exactly this on a fresh machine",
    ".venv/bin/pip install": "the set-up: .ci/run runs exactly this on a fresh machine",
    "source .venv/bin/activate": "the set-up: the tests run inside that environment",
    "-m pytest": "the test suite itself",
    "sbatch ": "needs a SLURM cluster",
    "JAX_COORDINATOR_ADDRESS=host0": "needs several hosts",
    "-m benchmarks.run": "minutes of timing; run by hand (BENCHMARKS.md)",
}
PLACEHOLDER = re.compile(r"\b(NAME|DIR|CONFIG|WORKDIR|BUCKET|ZONE|VARIANT|KEY|VALUE|N)\b|\[--")


def _logical_lines(lines):
  """Lines with backslash continuations joined and comments dropped."""
  out, current = [], ""
  for line in lines:
    line = line.rstrip()
    if line.endswith("\\"):
      current += line[:-1].rstrip("\\").rstrip() + " "
      continue
    current += line
    text = re.sub(r"\s+#\s.*$", "", current).strip()
    if text and not text.startswith("#"):
      out.append(text)
    current = ""
  return out


def documented_commands() -> list[tuple[str, str]]:
  """(where, command) for every shell command in the documents' code blocks and the sources'
  docstrings (lines that start a known program), and every Python block of the documents."""
  found = []
  for doc in DOCUMENTS:
    text = doc.read_text()
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
      if lang == "python":
        found.append((doc.name, "PYTHON:" + block))
        continue
      for line in _logical_lines(block.splitlines()):
        found.extend((doc.name, part.strip()) for part in line.split("&&"))
    indented = [l[4:] for l in text.splitlines() if l.startswith("    ")
                and l.strip().startswith(PROGRAMS)]
    found.extend((doc.name, c) for c in _logical_lines(indented))
  for path in SOURCES:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
        doc = ast.get_docstring(node, clean=True) or ""
        lines = [l.strip() for l in doc.splitlines()]
        starts = [i for i, l in enumerate(lines) if l.startswith("python -m nonuniform_jax.")]
        for i in starts:
          block = [lines[i]]
          while block[-1].endswith("\\") and i + len(block) < len(lines):
            block.append(lines[i + len(block)])
          found.extend((str(path.relative_to(ROOT)), c) for c in _logical_lines(block))
  unique = {}
  for where, command in found:
    unique.setdefault(command, where)
  return [(where, command) for command, where in unique.items()]


COMMANDS = documented_commands()
TINY_TRAIN = ["--config.num_steps=2", "--config.num_train_examples=0", "--config.log_every=1", "--config.eval_every=2",
              "--config.checkpoint_every=2", "--config.batch_size=8",
              "--config.train_eval_examples=32", "--config.eval_batch_size=16",
              "--config.measures.num_examples=16", "--config.measures.batch_size=8",
              "--config.measures.settings.batch_gradient_noise.batch_size=4",
              "--config.measures.settings.lambda_max.num_iters=3",
              "--config.measures.settings.wu_nonuniformity.num_iters=3",
              "--config.measures.settings.hessian_trace.num_probes=2",
              "--config.progress=False"]
TINY_STUDY = {
    "toy_minima": ["--config.num_seeds=2", "--config.num_steps=8"],
    "two_param": ["--config.num_seeds=1", "--config.num_steps=20", "--config.num_examples=400"],
    "sparse_regression": ["--config.num_seeds=1", "--config.num_epochs=2",
                          "--config.haochen.enabled=False"],
}
# Tiny scale for the models too: the same classes with few, narrow layers (the documented
# config, pipeline, optimizer and command line are what is under test; tests/test_models.py
# checks the full-size architectures).
_TINY_CIFAR_RESNET = {"depth": 8, "width": 4}
_TINY_RESNET = {"stage_sizes": (1, 1, 1, 1), "width": 4}
_TINY_WRN = {"depth": 10, "widen_factor": 1}
_TINY_VIT = {"hidden_size": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}
TINY_MODELS = {
    "cifar_resnet": _TINY_CIFAR_RESNET, "resnet20": _TINY_CIFAR_RESNET,
    "resnet32": _TINY_CIFAR_RESNET, "resnet56": _TINY_CIFAR_RESNET,
    "resnet18": _TINY_RESNET, "resnet50": _TINY_RESNET, "preact_resnet18": _TINY_RESNET,
    "wide_resnet": _TINY_WRN, "wrn16_8": _TINY_WRN, "wrn28_6": _TINY_WRN, "wrn28_10": _TINY_WRN,
    "wrn58_6": _TINY_WRN, "vgg16_bn": {"stages": ((8,), (8,))},
    "pyramidnet": {"depth": 11, "alpha": 8}, "pyramidnet110": {"depth": 11, "alpha": 8},
    "densenet": {"depth": 10, "growth_rate": 4}, "densenet100": {"depth": 10, "growth_rate": 4},
    "vit": _TINY_VIT, "vit_tiny": _TINY_VIT, "vit_small": _TINY_VIT, "vit_base": _TINY_VIT,
}
TFDS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "imagenet2012", "food101")


def _not_run(command: str) -> str | None:
  for needle, why in NOT_RUN.items():
    if needle in command:
      return why
  if PLACEHOLDER.search(command) and "launch/tpu_vm.sh" not in command:
    return "a template (placeholders in capitals); the concrete commands beside it run"
  return None


def _config_of(argv) -> tuple[str, str]:
  spec = next(a.split("=", 1)[1] if "=" in a else argv[argv.index(a) + 1]
              for a in argv if a.startswith("--config") and not a.startswith("--config."))
  path, _, variant = spec.partition(":")
  return path, variant


def _tiny(argv) -> list[str]:
  import runpy  # pylint: disable=g-import-not-at-top
  path, variant = _config_of(argv)
  module = runpy.run_path(str(ROOT / path))
  config = module["get_config"](variant) if variant else module["get_config"]()
  if config.task in TINY_STUDY:
    return TINY_STUDY[config.task]
  extra = ["--config.image_size=32"] if config.dataset in ("imagenet2012", "food101") else []
  return TINY_TRAIN + extra


def _tiny_checkpoint(argv, tmp: pathlib.Path) -> list[str]:
  """A command that starts from a published ViT checkpoint (``model.pretrained`` in its config or
  on its line) gets one written here in the AugReg layout for the tiny model, at 224 px with
  1000 classes as published, in place of the file it names (which is not here)."""
  import runpy  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import models  # pylint: disable=g-import-not-at-top
  from tests import pretrained_reference  # pylint: disable=g-import-not-at-top
  path, variant = _config_of(argv)
  config = runpy.run_path(str(ROOT / path))["get_config"](*([variant] if variant else []))
  given = _flag(argv, "--config.model.pretrained")
  if "model" not in config or not (config.model.get("pretrained") if given is None else given):
    return []
  kwargs = {k: v for k, v in config.model.items() if k not in ("name", "pretrained")}
  vit = models.get_model(config.model.name, 1000, **kwargs)
  file = tmp / f"tiny_{config.model.name}_augreg.npz"
  np.savez(file, **pretrained_reference.augreg_vit(
      hidden=vit.hidden_size, depth=vit.depth, heads=vit.num_heads, mlp=vit.mlp_dim,
      patch=vit.patch_size, grid=224 // vit.patch_size, classes=1000, token=vit.pool == "token"))
  return [f"--config.model.pretrained={file}"]


@contextlib.contextmanager
def _mock_tfds_if_needed(argv):
  import runpy  # pylint: disable=g-import-not-at-top
  path, variant = _config_of(argv)
  module = runpy.run_path(str(ROOT / path))
  config = module["get_config"](variant) if variant else module["get_config"]()
  if config.get("dataset") in TFDS:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    with tfds.testing.mock_data(num_examples=64):
      yield
  else:
    yield


def _tiny_sweep(argv) -> list[str]:
  """A sweep command at its config's ``tiny`` scale (the same members, or for the laptop study
  five, of a few steps and tiny networks)."""
  out = []
  for i, arg in enumerate(argv):
    if (arg.startswith("--config=") or (i and argv[i - 1] == "--config")) and "tiny" not in arg:
      arg += ",tiny" if ":" in arg else ":tiny"
    out.append(arg)
  assert any("tiny" in arg for arg in out), f"no sweep config to make tiny in {argv}"
  return out


PATH_FLAGS = ("--workdir", "--logdir", "--out")


def _rewrite_workdirs(argv, tmp: pathlib.Path) -> list[str]:
  out = []
  for i, arg in enumerate(argv):
    flag, eq, value = arg.partition("=")
    if eq and flag in PATH_FLAGS:
      arg = f"{flag}=" + str(tmp / value.strip("/").replace("/", "_"))
    elif i and argv[i - 1] in PATH_FLAGS:
      arg = str(tmp / arg.strip("/").replace("/", "_"))
    out.append(arg)
  return out


def _flag(argv, name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(name + "="):
      return arg.split("=", 1)[1]
    if arg == name and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _make_logdir(argv, tmp: pathlib.Path, flag: str = "--logdir") -> None:
  """A plot (or measure) command reads what an earlier documented command made. When that has
  not run (the test run alone, ``-k plot``, or on another test worker), run it first: the
  documented training command whose --workdir is the plot's --logdir (the measure's
  --workdir)."""
  logdir = _flag(argv, flag)
  if logdir is None or os.path.exists(logdir):
    return
  from nonuniform_jax import main, sweep  # pylint: disable=g-import-not-at-top
  for _, command in COMMANDS:
    words = shlex.split(command) if not command.startswith("PYTHON:") else []
    if words[:3] in (["python", "-m", "nonuniform_jax.main"],
                     [".venv/bin/python", "-m", "nonuniform_jax.main"]):
      args = _rewrite_workdirs(["nonuniform_jax.main", *words[3:]], tmp)
      if _flag(args, "--workdir") == logdir:
        assert main.command(args + _tiny(args)) == 0, command
        return
    if words[:3] == ["python", "-m", "nonuniform_jax.sweep"] and not _not_run(command):
      args = _rewrite_workdirs(["nonuniform_jax.sweep", *words[3:]], tmp)
      if _flag(args, "--workdir") == logdir:
        assert sweep.command(_tiny_sweep(args)) == 0, command
        return


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """One folder for every command, so that a measure command finds the run it documents."""
  return tmp_path_factory.mktemp("documented")


def test_every_documented_command_is_found():
  texts = [c for _, c in COMMANDS]
  assert any("nonuniform_jax.main --config configs/default.py" in c for c in texts)
  assert any(c.startswith("python -m nonuniform_jax.measure") for c in texts)
  assert any(c.startswith("PYTHON:") for c in texts)


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c[:70]}" for w, c in COMMANDS])
def test_documented_command_runs(where, command, workdirs, monkeypatch, capsys):
  from nonuniform_jax import models  # pylint: disable=g-import-not-at-top
  for name, tiny in TINY_MODELS.items():
    cls, preset = models.MODELS[name]
    monkeypatch.setitem(models.MODELS, name, (cls, {**preset, **tiny}))
  if command.startswith("PYTHON:"):
    exec(compile(command[len("PYTHON:"):], where, "exec"), {})   # pylint: disable=exec-used
    return
  why = _not_run(command)
  if why:
    pytest.skip(why)
  monkeypatch.chdir(ROOT)
  words = shlex.split(command)
  env = {}
  while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
    key, _, value = words.pop(0).partition("=")
    env[key] = value
  program = words[0]
  if program in ("python", ".venv/bin/python") and words[1] == "-m" and words[2].startswith(
      "nonuniform_jax."):
    module = words[2].split(".", 1)[1]
    argv = _rewrite_workdirs([f"nonuniform_jax.{module}", *words[3:]], workdirs)
    if "--help" in argv:
      # pylint: disable-next=g-import-not-at-top
      from nonuniform_jax import main, measure, plot, sweep
      with pytest.raises(SystemExit) as info:
        {"main": main, "measure": measure, "plot": plot, "sweep": sweep}[module].command(argv)
      assert info.value.code == 0 and "usage" in capsys.readouterr().out.lower()
      return
    if module == "main":
      from nonuniform_jax import main  # pylint: disable=g-import-not-at-top
      argv += _tiny(argv) + _tiny_checkpoint(argv, workdirs)
      with _mock_tfds_if_needed(argv):
        status = main.command(argv)
      assert status == 0, (where, command)
      out = capsys.readouterr().out
      if _flag(argv, "--config.model.pretrained"):
        assert "parameters from " in out and "new classifier" in out, out
      if "test accuracy" in out and "label_noise" in command:
        import json  # pylint: disable=g-import-not-at-top
        i = next(i for i, a in enumerate(argv) if a.startswith("--workdir"))
        workdir = pathlib.Path(argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1])
        record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
        assert {"eval_train_accuracy_noisy", "eval_train_accuracy_noisy_true",
                "eval_train_accuracy_clean"} <= set(record)
        assert (workdir / "label_noise.npz").exists()
    elif module == "measure":
      from nonuniform_jax import measure  # pylint: disable=g-import-not-at-top
      _make_logdir(argv, workdirs, "--workdir")
      capsys.readouterr()
      status = measure.command(argv)
      assert status == 0 and "measure/" in capsys.readouterr().out
    elif module == "sweep":   # every dataset mocked: the tiny members train, or only emit
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      from nonuniform_jax import sweep  # pylint: disable=g-import-not-at-top
      with tfds.testing.mock_data(num_examples=64):
        status = sweep.command(_tiny_sweep(argv))
      out = capsys.readouterr().out
      assert status == 0, (where, command, out)
      assert "python -m nonuniform_jax.plot --logdir" in out, out
    elif module == "plot":
      from nonuniform_jax import plot  # pylint: disable=g-import-not-at-top
      _make_logdir(argv, workdirs)
      capsys.readouterr()
      assert plot.command(argv) == 0, (where, command)
      written = capsys.readouterr().out.split()
      assert written and all(os.path.exists(p) for p in written), written
    else:
      pytest.fail(f"{where}: no way to run {command!r}")
    return
  if program in ("python", ".venv/bin/python") and words[1:3] == ["-m",
                                                                  "benchmarks.sam_family_table"]:
    from benchmarks import sam_family_table  # pylint: disable=g-import-not-at-top
    argv = _rewrite_workdirs(words[3:], workdirs)
    assert sam_family_table.main(argv + ["--seeds", "0", "--methods", "sgd,csam_kfac",
                                         "--num_steps", "2"]) == 0
    assert "| CSAM K-FAC |" in capsys.readouterr().out
    return
  if program == "tensorboard":
    assert pathlib.Path(sys.executable).with_name("tensorboard").exists()
    return
  if program.startswith("launch/"):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env, "DRY_RUN": "1", "SETUP": "0"}
    args = _rewrite_workdirs(words, workdirs)
    # The launchers take the workdir as a positional argument: it too goes to the test's folder,
    # not into the repository.
    args = [str(workdirs / a.replace("/", "_")) if a.startswith("workdirs/") else a for a in args]
    if program == "launch/gpu.sh":   # runs here on the CPU, without installing CUDA, on mock data
      env["PYTHONPATH"] = f"{ROOT / 'tests' / 'mock_tfds'}:{ROOT}"
      env["NONUNIFORM_JAX_MOCK_TFDS"] = "1"
      args += TINY_TRAIN
    if program == "launch/local_multiprocess.sh":   # tiny, with this interpreter
      env["PYTHON"] = sys.executable
      args += TINY_TRAIN
    result = subprocess.run(["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
    return
  pytest.fail(f"{where}: documented command {command!r} is neither run by this test nor listed "
              "in NOT_RUN with a reason")
