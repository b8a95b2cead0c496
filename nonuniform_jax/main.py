"""Command line: ``python -m nonuniform_jax.main --config configs/NAME.py --workdir DIR``.

Overrides: ``--config.optimizer.learning_rate=0.05``, ``--config.model.widths='(128,64)'``.
``--help`` lists the configs and the most used settings. This file only parses and calls
``train.train_and_evaluate``; exit statuses are those of ``nonuniform_jax.cli`` (0 completed,
2 bad input, 3 diverged, 69 another process lost, 75 disk full, 130 interrupted).
"""

import ast
import difflib
import os
import pathlib
import re
import sys

from nonuniform_jax import cli  # first: it quiets TensorFlow before anything imports it

from absl import flags  # pylint: disable=g-bad-import-order,wrong-import-position
from ml_collections import config_flags  # pylint: disable=wrong-import-position

USAGE = ("usage: python -m nonuniform_jax.main --config configs/NAME.py[:VARIANT] --workdir DIR "
         "[--config.KEY=VALUE ...]")
# The settings a first run most often changes (configs/default.py lists them all).
MAIN_SETTINGS = ("dataset", "num_train_examples", "model.name", "optimizer.name",
                 "optimizer.base", "optimizer.learning_rate", "optimizer.momentum",
                 "optimizer.weight_decay", "schedule.name", "batch_size", "num_steps",
                 "num_epochs", "seed", "sam.rho", "csam.rho1", "csam.rho2", "csam.alpha",
                 "csam.metric", "label_smoothing", "label_noise.kind", "label_noise.rate",
                 "measure_nonuniformity", "measures.names", "measures.every_steps",
                 "eval_every", "checkpoint_every", "progress", "overwrite")


def configs_dir() -> pathlib.Path:
  """The repository's configs/ (beside the package), else ./configs."""
  beside = pathlib.Path(__file__).resolve().parents[1] / "configs"
  return beside if beside.is_dir() else pathlib.Path("configs")


def help_text() -> str:
  """Usage, every config with the first line of its docstring, the main settings with their
  defaults, and the exit statuses."""
  lines = [USAGE, "", "configs (each docstring holds the exact commands that run it):"]
  folder = configs_dir()
  for path in sorted(folder.glob("*.py")):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    lines.append(f"  {shown:32s} {first}")
  lines += ["", "main settings (--config.KEY=VALUE; configs/default.py lists and explains all):"]
  sys.path.insert(0, str(folder.parent))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  for key in MAIN_SETTINGS:
    value = config
    for part in key.split("."):
      value = value[part]
    lines.append(f"  --config.{key}={value!r}")
  lines += ["", "exit status: 0 completed, 2 bad input (one line, nothing written), 3 diverged, "
            "69 another process of a multi-process run lost, 75 disk full, 130 interrupted (the "
            "same command resumes)",
            "measures on a finished run: python -m nonuniform_jax.measure --help"]
  return "\n".join(lines)


def _config_path(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return ""


def _closest_key(dotted: str) -> str | None:
  """The existing key of configs/default.py (which lists every setting) closest to ``dotted``,
  segment by segment (``optimzer.name`` -> ``optimizer.name``), or None."""
  sys.path.insert(0, str(configs_dir().parent))
  from configs import default  # pylint: disable=g-import-not-at-top
  node, path = default.get_config().to_dict(), []
  for part in dotted.split("."):
    if not isinstance(node, dict):
      return None
    if part not in node:
      close = difflib.get_close_matches(part, list(node), n=1, cutoff=0.6)
      if not close:
        return None
      part = close[0]
    path.append(part)
    node = node[part]
  return ".".join(path)


def _unknown_setting(argv, text: str) -> str:
  """The one-line message for an override naming a key the config lacks, with the closest
  existing key."""
  # ml_collections' text quotes the key, escaped once or twice over (repr inside repr).
  plain = text.replace("\\", "")
  missing = (re.search(r'instead of "([A-Za-z_]\w*)"', plain)
             or re.search(r"'([A-Za-z_]\w*)'", plain))
  key = missing.group(1) if missing else None
  overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  override = next((o for o in overrides if key and key in o.split(".")), None)
  if override is None and len(overrides) == 1:
    override = overrides[0]
  close = _closest_key(override.removeprefix("--config.")) if override else None
  hint = f" (did you mean --config.{close}?)" if close else ""
  name = override or "--config." + (key or "?")
  return (f"unknown setting {name}: the config has no such key{hint}; configs/default.py "
          "lists every setting")


def parse(argv) -> tuple:
  """``(config, workdir)`` from a command line. ``--help`` prints this command's help and exits
  0; a config file or override that fails (a missing or broken file, an unknown variant, an
  unknown key, a bad value) ends the process with one line and exit status 2.

  The flags are defined anew for each call (``ml_collections`` reads the config file named in
  ``argv`` to define its overrides), so one process may run several commands.
  """
  if any(a in ("-h", "--help", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
    print(help_text())
    sys.exit(cli.EXIT_OK)
  path = _config_path(argv)
  flag_values = flags.FlagValues()
  config_flag = config_flags.DEFINE_config_file(
      "config", None, "Path to an ml_collections config file (configs/NAME.py[:variant]).",
      flag_values=flag_values, lock_config=True, sys_argv=list(argv))
  workdir_flag = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and "
                                     "summary.", flag_values=flag_values)
  try:
    rest = flag_values(list(argv))
  except KeyError as e:   # an override whose key is misspelled (ml_collections suggests one)
    cli.fail(_unknown_setting(argv, str(e.args[0] if e.args else e)))
  # ml_collections raises these from inside absl's parsing: OSError for a config file that did
  # not load (once overrides ask it for their types), AttributeError for an unknown key.
  except (flags.Error, OSError, AttributeError) as e:
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[-1] if lines else text
    unknown = isinstance(e, AttributeError) or (
        isinstance(e, flags.UnrecognizedFlagError) and e.flagname.startswith("config."))
    if path and not os.path.exists(path):
      message = (f"cannot load config file {path!r}: no such file (paths are relative to the "
                 "current directory)")
    elif "Error whilst parsing config file" in text:
      message = f"config file {path!r}: {message}"
    elif unknown:
      message = _unknown_setting(argv, text)
    cli.fail(message)
  except Exception as e:  # pylint: disable=broad-except
    # The config file itself raised while it was loaded (with overrides it loads here).
    cli.fail(f"cannot load config file {path!r}: {type(e).__name__}: {e}")
  if len(rest) > 1:
    cli.fail(f"unexpected arguments {rest[1:]}; {USAGE}")
  missing = [name for name in ("config", "workdir") if flag_values[name].value is None]
  if missing:
    cli.fail(f"missing --{' and --'.join(missing)}; {USAGE} (--help lists the configs)")
  try:
    config = config_flag.value
    config.get("task")   # a config file that failed to load raises here
  except (OSError, ImportError, SyntaxError) as e:
    cli.fail(f"cannot load config file {path!r} ({type(e).__name__}): check the path "
             "(relative to the current directory) and that it defines get_config()")
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(f"cannot load config file {path!r}: {type(e).__name__}: {e}")
  return config, workdir_flag.value


def command(argv) -> int:
  """The whole command for ``argv`` (``argv[0]`` is the program): parse, check, train or report.
  Returns the exit status of a run that ended (0, or 3 diverged); the others end the process
  through ``cli.fail`` (SystemExit with 2, 75 or 130) or ``cli.peer_lost`` (69)."""
  config, workdir = parse(argv)
  cli.quiet_logs()
  from nonuniform_jax import parallel, train  # pylint: disable=g-import-not-at-top

  def start_and_train():
    # Several processes (the environment says so): start JAX's runtime before anything else of
    # JAX, then keep its C++ runtime's messages to one line.
    if parallel.initialize_distributed(on_peer_lost=cli.peer_lost):
      import jax  # pylint: disable=g-import-not-at-top
      cli.one_line_runtime_errors(jax.process_index(), jax.process_count())
    return train.train_and_evaluate(config, workdir)
  summary = cli.guarded(start_and_train, workdir)
  return cli.EXIT_DIVERGED if summary.get("status") == "diverged" else cli.EXIT_OK


def run():
  cli.as_program()
  sys.exit(command(sys.argv))


if __name__ == "__main__":
  run()
