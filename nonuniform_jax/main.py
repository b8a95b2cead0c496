"""Command line: ``python -m nonuniform_jax.main --config configs/NAME.py --workdir DIR``.

Overrides: ``--config.optimizer.learning_rate=0.05``, ``--config.model.widths='(128,64)'``.
This file only parses and calls ``train.train_and_evaluate``; a bad setting ends the process
with a one-line error and exit status 2, before anything is compiled.
"""

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up notices

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/NAME.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and summary.")
flags.mark_flags_as_required(["config", "workdir"])


def quiet_logs() -> None:
  """JAX reports at INFO each accelerator backend it does not find, Orbax and CLU every save
  and scalar; the progress bar and the workdir's files already say what matters."""
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_logs()
  from nonuniform_jax import parallel, train  # pylint: disable=g-import-not-at-top
  parallel.initialize_distributed()
  try:
    config = _CONFIG.value
    config.get("task")  # a config file that failed to load raises here
  except (OSError, ImportError, SyntaxError) as e:
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    print(f"error: cannot load config file {path!r} ({type(e).__name__}): check the path "
          "(relative to the current directory) and that it defines get_config()",
          file=sys.stderr)
    sys.exit(2)
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except ValueError as e:
    logging.debug("configuration error", exc_info=True)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _config_path(argv) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return ""


def parse_flags(argv):
  """absl's flag parser, but a config file or override that fails while the flags are parsed
  (an unknown variant, a missing file given with overrides, an unknown key, a bad value) ends
  the process with one line and exit status 2, as every other bad setting does."""
  try:
    return flags.FLAGS(argv)
  # ml_collections raises these from inside absl's parsing: OSError for a config file that did
  # not load (once overrides ask it for their types), AttributeError for an unknown key.
  except (flags.Error, OSError, AttributeError) as e:
    text = str(e)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[-1] if lines else text
    path = _config_path(argv)
    unknown = isinstance(e, AttributeError) or (
        isinstance(e, flags.UnrecognizedFlagError) and e.flagname.startswith("config."))
    if path and not os.path.exists(path):
      message = (f"cannot load config file {path!r}: no such file (paths are relative to the "
                 "current directory)")
    elif "Error whilst parsing config file" in text:
      message = f"config file {path!r}: {message}"
    elif unknown:
      name = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                   and _unknown_key(a, text)), "--config.?")
      message = (f"unknown setting {name}: the config {path!r} has no such key "
                 "(configs/default.py lists every setting)")
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _unknown_key(arg: str, error_text: str) -> bool:
  """Whether the override ``--config.a.b=...`` names the key an error complains about."""
  keys = arg.split("=", 1)[0].removeprefix("--config.").split(".")
  return any(f"'{k}'" in error_text for k in keys)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
