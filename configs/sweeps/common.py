"""What the sweep configs share (no sweep of its own): the measures each member takes on its final
model, at cluster, laptop and test scale; the settings that make a sweep tiny; variant strings.

Every sharpness measure is named in ``measures.names`` and ``measure_nonuniformity=True`` adds
the nonuniformity set (gradient_noise, batch_gradient_noise, wu_nonuniformity, kfac_structure,
diagnostics): docs/measures.md defines each.
"""

SHARPNESS = ("lambda_max", "top_eigenvalues", "hessian_trace", "hessian_esd", "sam_sharpness",
             "worst_case_sharpness", "average_sharpness", "pacbayes_flatness")

# The tests' scale: a few steps on a few examples (with tfds.testing.mock_data's 64 examples for
# the TFDS datasets), evaluated and checkpointed at the end.
TINY = {"num_steps": 2, "num_epochs": 0.0, "num_train_examples": 0, "batch_size": 8,
        "eval_batch_size": 16, "train_eval_examples": 32, "log_every": 1, "eval_every": 2,
        "checkpoint_every": 2}


def measures(scale: str) -> dict:
  """The measures on each member's final model, as dotted overrides. 'cluster': every measure
  with configs/default.py's settings (1024 examples, 100 Lanczos iterations, 100 probes...);
  'laptop': every measure on 512 examples with fewer iterations, probes and draws; 'tiny': tr Σ
  alone by its fast path, on 16 examples (the cheapest to compile: λ_max's Lanczos iterations
  through a BatchNorm network take half a minute to compile on a 2-core CPU)."""
  every = {"measures.names": SHARPNESS, "measure_nonuniformity": True,
           "measures.every_steps": 0}
  if scale == "cluster":
    return every
  if scale == "laptop":
    s = "measures.settings."
    return {**every, "measures.num_examples": 512, "measures.batch_size": 256,
            s + "lambda_max.num_iters": 20, s + "top_eigenvalues.k": 3,
            s + "top_eigenvalues.num_iters": 20, s + "hessian_trace.num_probes": 10,
            s + "hessian_esd.num_iters": 20, s + "worst_case_sharpness.num_steps": 10,
            s + "average_sharpness.num_draws": 10, s + "pacbayes_flatness.search_depth": 8,
            s + "pacbayes_flatness.num_samples": 5, s + "wu_nonuniformity.num_iters": 20}
  if scale == "tiny":
    return {"measures.names": ("gradient_noise",), "measure_nonuniformity": False,
            "measures.every_steps": 0, "measures.num_examples": 16, "measures.batch_size": 8,
            "measures.settings.gradient_noise.method": "auto"}
  raise ValueError(f"unknown scale {scale!r}; choose 'cluster', 'laptop' or 'tiny'")


def tokens(variant: str, known: tuple) -> set:
  """The comma-separated tokens of a config string; unknown ones are errors."""
  found = set(filter(None, variant.split(",")))
  if found - set(known):
    raise ValueError(f"unknown config variant {sorted(found - set(known))}; choose from "
                     f"{list(known)}")
  return found


def scale(found: set) -> str:
  """'tiny', 'laptop' or 'cluster' from a config string's tokens."""
  if {"tiny", "laptop"} <= found:
    raise ValueError("choose one of 'tiny' and 'laptop'")
  return "tiny" if "tiny" in found else "laptop" if "laptop" in found else "cluster"
