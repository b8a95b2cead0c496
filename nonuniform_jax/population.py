"""Populations: the members of a sweep that share their shapes, trained together.

PLACEHOLDER, to be replaced by the population trainer (members vmapped in one compiled program).
This version keeps the interface and trains each member on its own with ``train.train``, so the
sweep runner can be built and tested against it: ``POPULATION_KEYS`` is empty and
``shape_key`` is the member's whole config, so every member is a population of one.
"""

import contextlib
import io
import json

from nonuniform_jax import plan as plan_lib, train

# The settings that members of one population may differ in (none here).
POPULATION_KEYS: tuple[str, ...] = ()


def shape_key(plan: plan_lib.Plan) -> str:
  """Members with equal keys may train in one population: here, only a member with itself."""
  return json.dumps(plan.config, sort_keys=True)


def train_population(plans: list[plan_lib.Plan], workdirs: list[str]) -> list[dict]:
  """Trains (or resumes, or only reports) each plan in its workdir; returns their summaries.
  The members' own start and final lines are not printed: the sweep prints one line per
  population."""
  summaries = []
  for plan, workdir in zip(plans, workdirs):
    with contextlib.redirect_stdout(io.StringIO()):
      summaries.append(train.train(plan, workdir))
  return summaries
