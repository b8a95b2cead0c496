"""Every optimizer the trainer knows (``optim.family``) trains end to end through it, with the
gradient evaluations per step its entry declares; the registry is the only place that names
them."""

import ast
import pathlib

import jax
import numpy as np
import pytest

from nonuniform_jax import checkpoints, plan, train
from nonuniform_jax.optim import family, kfac
from tests.test_train import read_lines, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", family.NAMES)
def test_every_entry_trains_through_the_trainer(name, tmp_path):
  config = small_config(**{"optimizer.name": name, "num_steps": 4, "log_every": 2,
                           "eval_every": 4, "checkpoint_every": 4, "kfac.stats_every": 2,
                           "kfac.inverse_every": 2, "batch_size": 32})
  config.model.widths = (16,)
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["status"] == "completed"
  entry = family.get(name)
  assert summary["settings"]["gradient_evaluations_per_step"] == entry.passes
  lines = read_lines(tmp_path / "metrics.jsonl")
  assert len(lines) == 2 and all(np.isfinite(r["train_loss"]) for r in lines)
  init = train.build(plan.read(config)).state.params
  final = checkpoints.read_state(str(tmp_path))["params"]
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(final),
                                                   jax.tree.leaves(init)))


@pytest.mark.parametrize("name,metric", [("csam", "kfac"), ("gam", "identity"),
                                         ("csam", "identity"), ("sam", "identity")])
def test_the_loop_reads_the_optimizers_kfac_schedule(name, metric):
  """The plan holds the ``kfac.Schedule`` that ``family`` builds the optimizer with (one
  function, ``family.kfac_schedule``), only when the step captures the factors."""
  config = small_config(**{"optimizer.name": name, "csam.metric": metric,
                           "kfac.stats_every": 3, "kfac.inverse_every": 6,
                           "kfac.ema_decay": 0.9})
  p = plan.read(config)
  captures = "kfac_factors" in p.optimizer.needs
  assert captures == (name == "gam" or metric == "kfac")
  assert p.optimizer.kfac_schedule == (kfac.Schedule(3, 6, 0.9) if captures else None)
  assert family.kfac_schedule(p.optimizer.settings) == kfac.Schedule(3, 6, 0.9)
  # and the start-up line shows the K-FAC settings where they are used
  line = family.describe(p.optimizer.name, p.optimizer.settings)
  assert ("kfac.stats_every=3 kfac.unfactored=zero" in line) == captures, line


def test_the_trainer_names_no_optimizer():
  """train.py, plan.py, steps.py and evaluators.py hold no optimizer's name as a string: an
  optimizer is added in optim/family.py alone."""
  names = set(family.NAMES)
  for module in ("train", "plan", "steps", "evaluators"):
    tree = ast.parse((ROOT / "nonuniform_jax" / f"{module}.py").read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert not strings & names, (module, strings & names)


def test_unknown_optimizer_names_the_choices():
  with pytest.raises(ValueError, match=r"unknown optimizer 'lamb'; choose one of \['sgd'"):
    family.get("lamb")
