"""The package's one way of refusing a bad value: a ValueError of one line that names the
setting, the value and what is valid, raised before anything is loaded, compiled or written.

    checks.choice("optimizer", "lamb", ("sgd", "sam"))   # unknown optimizer 'lamb'; choose ...
    checks.positive("optimizer.learning_rate", 0.0)       # ... must be > 0, got 0.0
"""

import math
import numbers
from typing import Any, Iterable, Sequence

import jax


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def traced(value) -> bool:
  """Whether ``value`` is a JAX tracer: a setting that varies across a vmapped population
  (``population.py``). The number checks below pass it: its members' values were checked,
  concretely, when their plans were read."""
  return isinstance(value, jax.core.Tracer)


def choice(kind: str, value, choices: Sequence) -> None:
  if value not in choices:
    raise ValueError(f"unknown {kind} {value!r}; choose one of {list(choices)}")


def choices(kind: str, values: Sequence, valid: Sequence) -> None:
  """A non-empty sequence of ``kind``s, each one of ``valid``."""
  if not values:
    raise ValueError(f"no {kind} given; choose one or more of {list(valid)}")
  for value in values:
    choice(kind, value, valid)


def positive(name: str, value) -> None:
  """A finite number > 0."""
  if not traced(value) and not (_is_number(value) and math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative(name: str, value) -> None:
  """A finite number >= 0."""
  if not traced(value) and not (_is_number(value) and math.isfinite(value) and value >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def integer(name: str, value, minimum: int = 0) -> None:
  """An integer >= ``minimum``."""
  if not (isinstance(value, numbers.Integral) and not isinstance(value, bool)
          and value >= minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def in_range(name: str, value, low: float, high: float, *, high_open: bool = False) -> None:
  """A number in [low, high] (or [low, high) with ``high_open``)."""
  if traced(value):
    return
  if not (_is_number(value) and low <= value
          and (value < high if high_open else value <= high)):
    bound = ")" if high_open else "]"
    raise ValueError(f"{name} must be in [{low}, {high}{bound}, got {value!r}")


def _leaves(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _leaves(value, f"{prefix}{key}.")
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      yield from _leaves(value, f"{prefix}{i}.")
  else:
    yield prefix[:-1], tree


def finite_numbers(tree: dict, allow_infinite: Sequence[str] = ()) -> None:
  """Every number in a (nested) settings dict is finite: NaN is never a setting, and an
  infinite one only where ``allow_infinite`` names it (e.g. an ℓ∞ norm's p)."""
  for name, value in _leaves(tree):
    if _is_number(value) and not math.isfinite(value):
      if math.isnan(value) or name not in allow_infinite:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
