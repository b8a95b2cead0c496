"""Small synthetic sweeps and runs on disk, in the trainer's file formats, for the analysis and
plot tests."""

import itertools
import json
import math
import os

import numpy as np


def _write(path, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _summary(status, config, final, measures, diverged_step=None) -> dict:
  return {"status": status, "diverged_step": diverged_step, "config": config, "final": final,
          "measures": measures}


def write_sweep(root, criterion=None) -> dict:
  """A 3 × 3 × 2 grid (learning rate × batch × seed) of completed members whose measures
  follow Wu's scalings (sharpness a = 1.6/η, nonuniformity s ∝ √b/η) and whose gap grows with
  tr Σ, plus three members that must be excluded: one diverged, one unfinished (no summary),
  one at 0.9 training accuracy. Returns the expected {name: reason fragment} exclusions."""
  rng = np.random.default_rng(0)
  members = []
  for i, (rate, batch, seed) in enumerate(itertools.product((0.05, 0.1, 0.2), (32, 64, 128),
                                                            (0, 1))):
    name = f"{i:04d}"
    hyper = {"optimizer.learning_rate": rate, "batch_size": batch, "seed": seed}
    members.append({"name": name, "workdir": f"members/{name}", "hyperparameters": hyper})
    trace_sigma = 10 * math.sqrt(batch) / rate * (1 + 0.3 * rng.random())
    gap = 1e-4 * trace_sigma + 0.02 * rng.random()
    measures = {
        "lambda_max": {"lambda_max": 1.6 / rate * (1 + 0.1 * rng.random()),
                       "num_iters": 100, "converged": True, "seconds": rng.random()},
        "gradient_noise": {"trace_sigma": trace_sigma, "chunk_size": 64, "method": "chunked"},
        "wu_nonuniformity": {"nonuniformity": 0.5 * math.sqrt(batch) / rate
                                              * (1 + 0.2 * rng.random())},
    }
    final = {"test_accuracy": 0.9 - gap, "test_loss": 0.3 + gap, "eval_train_accuracy": 1.0,
             "eval_train_loss": 0.3, "generalization_gap": gap, "accuracy_gap": 0.1 + gap,
             "step": 100}
    config = {"optimizer": {"name": "sgd", "learning_rate": rate}, "batch_size": batch,
              "seed": seed, "dataset": "mnist1d"}
    _write(os.path.join(root, "members", name, "summary.json"),
           _summary("completed", config, final, measures))
  base = {"optimizer.learning_rate": 0.1, "batch_size": 64, "seed": 2}
  extra = {"diverged": ("diverged", "diverged at step 7"), "unfinished": (None, "unfinished"),
           "short": ("completed", "missed the training criterion")}
  for name, (status, _) in extra.items():
    members.append({"name": name, "workdir": f"members/{name}", "hyperparameters": base})
    if status:
      final = {"test_accuracy": 0.5, "test_loss": 1.0, "eval_train_accuracy": 0.9,
               "eval_train_loss": 0.5}
      _write(os.path.join(root, "members", name, "summary.json"),
             _summary(status, {}, final, {}, 7 if status == "diverged" else None))
    else:
      os.makedirs(os.path.join(root, "members", name), exist_ok=True)
  _write(os.path.join(root, "sweep.json"),
         {"name": "synthetic", "base_config": "configs/default.py",
          "criterion": criterion or {"train_accuracy": 0.99}, "members": members})
  return {name: reason for name, (_, reason) in extra.items()}


def write_run(path, optimizer, dataset, final_accuracy, measures=True, status="completed"):
  """A run workdir with metrics.jsonl (training lines, evaluations, and measure lines when
  ``measures``) and, unless ``status`` is None, summary.json."""
  os.makedirs(path, exist_ok=True)
  records = []
  for step in range(1, 11):
    record = {"step": step, "train_loss": 2.0 / step, "train_accuracy": 1 - 0.5 / step}
    if step % 5 == 0:
      record.update({"test_loss": 2.2 / step, "test_accuracy": final_accuracy * step / 10,
                     "eval_train_loss": 2.0 / step, "eval_train_accuracy": 1 - 0.4 / step,
                     "generalization_gap": 0.2 / step, "accuracy_gap": 0.1})
      if measures:
        record.update({"measure/lambda_max/lambda_max": 10.0 + step,
                       "measure/gradient_noise/trace_sigma": 5.0 / step})
    records.append(record)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  config = {"optimizer": {"name": optimizer}, "dataset": dataset, "model": {"name": "mlp"}}
  if status:
    _write(os.path.join(path, "summary.json"),
           _summary(status, config, records[-1], {}))
  else:
    _write(os.path.join(path, "config.json"), config)
