"""Communication per train step on 8 data-parallel devices: bytes all-reduced, read off the
compiled program (XLA's SPMD partitioner inserts every collective), per optimizer.

Runs in a subprocess with 8 simulated CPU devices; on a CPU step times over simulated devices
mean nothing, bytes do. One gradient all-reduce per gradient evaluation is the goal: SGD moves
one gradient, SAM with a whole-batch perturbation two (the clean gradient's norm needs the
global gradient), SAM with m-sharpness groups inside each device's shard one.
"""

import json
import os
import re
import subprocess
import sys

CASES = {  # name -> (config overrides, gradient all-reduces expected)
    "sgd": ({}, 1),
    "sam (m = batch)": ({"optimizer.name": "sam"}, 2),
    "sam (m = 16, per device)": ({"optimizer.name": "sam", "sam.m": 16}, 1),
    "asam (m = 16, per device)": ({"optimizer.name": "asam", "sam.m": 16}, 1),
}

_DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s64": 8}


def all_reduce_bytes(hlo_text: str) -> int:
  """Sum of the result sizes of every all-reduce in an HLO module's text."""
  total = 0
  for line in hlo_text.splitlines():
    if not re.search(r"\ball-reduce(-start)?\(", line):
      continue
    lhs = line.split("=", 1)[1].split("all-reduce", 1)[0]
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", lhs):
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      total += size * _DTYPE_BYTES.get(dtype, 4)
  return total


def _measure() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import models, parallel, steps, train  # pylint: disable=g-import-not-at-top

  out = {}
  for name, (overrides, _) in CASES.items():
    config = default.get_config()
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
    settings = train.check_config(config)
    model = models.get_model("mlp", 10, widths=tuple(config.model.widths))
    tx, _, passes, l2 = train.build_optimizer(config, 100)
    mesh = parallel.data_mesh()
    x = jnp.zeros((config.batch_size, 40), jnp.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1])["params"])
    state = jax.eval_shape(lambda p: steps.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, batch_stats={}, opt_state=tx.init(p)), params)
    step = steps.make_train_step(model, tx, seed=0, l2=l2, passes=passes,
                                 groups=settings["forward_groups"],
                                 grouped_perturbation=settings["sam_groups"] > 1)
    batch = {"inputs": x, "labels": jnp.zeros((config.batch_size,), jnp.int32)}
    compiled = jax.jit(step, in_shardings=(parallel.replicated(mesh),
                                           parallel.batch_sharding(mesh)),
                       out_shardings=parallel.replicated(mesh)).lower(state, batch).compile()
    grad_bytes = sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(params))
    out[name] = {"bytes": all_reduce_bytes(compiled.as_text()), "grad_bytes": grad_bytes}
  return out


def run(quick: bool) -> list[dict]:
  del quick
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  result = subprocess.run([sys.executable, "-c",
                           "import json, benchmarks.bench_parallel as b; "
                           "print(json.dumps(b._measure()))"],
                          env=env, capture_output=True, text=True, check=True)
  measured = json.loads(result.stdout.strip().splitlines()[-1])
  rows = []
  for name, (_, expected) in CASES.items():
    m = measured[name]
    ratio = m["bytes"] / m["grad_bytes"]
    rows.append({"benchmark": "all-reduce per step, 8 devices, default MLP", "case": name,
                 "value": ratio, "unit": "x gradient size",
                 "goal": f"~{expected} (+ a few scalars)",
                 "ok": expected <= ratio < expected + 0.05,
                 "note": f"{m['bytes']} bytes; gradient {m['grad_bytes']} bytes"})
  return rows
