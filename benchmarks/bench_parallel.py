"""Communication per train step on 8 data-parallel devices: bytes all-reduced, read off the
compiled program (XLA's SPMD partitioner inserts every collective), per optimizer.

Runs in a subprocess with 8 simulated CPU devices; on a CPU step times over simulated devices
mean nothing, bytes do. One gradient all-reduce per gradient evaluation is the goal: SGD moves
one gradient, SAM with a whole-batch perturbation two (the clean gradient's norm needs the
global gradient), SAM with m-sharpness groups inside each device's shard one, CSAM three; GAM,
SAM-GCM and COV (whole batch in one group) two each (COV: g_B, which centres the per-example
gradients, then the mean of the per-example Hessian-vector products H_i (g_i − g_B)). A row's
value is the cheapest step (of a conditional's branches the cheaper); its note gives the most
expensive step where that differs (GAM all-reduces its Kronecker factors on the steps that
refresh them, one in ``kfac.stats_every``) and the bytes all-gathered where there are any (such
a row is not ok).
"""

import json
import os
import re
import subprocess
import sys

CASES = {  # name -> (config overrides, gradient all-reduces expected, note on the goal)
    "sgd": ({}, 1, ""),
    "sam (m = batch)": ({"optimizer.name": "sam"}, 2, ""),
    "sam (m = 16, per device)": ({"optimizer.name": "sam", "sam.m": 16}, 1, ""),
    "asam (m = 16, per device)": ({"optimizer.name": "asam", "sam.m": 16}, 1, ""),
    "csam (identity)": ({"optimizer.name": "csam", "csam.metric": "identity"}, 3, ""),
    "gam": ({"optimizer.name": "gam"}, 2, "; Kronecker factors on refresh steps"),
    "sam_gcm": ({"optimizer.name": "sam_gcm"}, 2, ""),
    "cov": ({"optimizer.name": "cov"}, 2, ""),
}

_DTYPE_BYTES = {"f32": 4, "f64": 8, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s64": 8}


def _result_bytes(line: str, op: str) -> int:
  """Size of the result of the HLO instruction on ``line`` (an array or a tuple of arrays)."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", line.split("=", 1)[1].split(op, 1)[0]):
    size = 1
    for d in filter(None, dims.split(",")):
      size *= int(d)
    total += size * _DTYPE_BYTES.get(dtype, 4)
  return total


def collective_bytes(hlo_text: str, op: str = "all-reduce", branch=max) -> int:
  """Bytes that the ``op`` collectives (result sizes) move in one run of an HLO module's entry
  computation, with those of the computations it calls; of each conditional's branches only
  ``branch`` counts (``max``: the most expensive step, ``min``: the cheapest; e.g. GAM refreshes
  its Kronecker factors, and all-reduces them, on one step in ``kfac.stats_every``)."""
  own, called, conditionals, entry, name = {}, {}, {}, None, None
  for line in hlo_text.splitlines():
    header = re.match(r"(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(2)
      entry = name if header.group(1) else entry
      own[name], called[name], conditionals[name] = 0, [], []
    elif name is not None:
      if re.search(rf"\b{op}(-start)?\(", line):
        own[name] += _result_bytes(line, op)
      called[name] += re.findall(r"\b(?:to_apply|calls|body)=%?([\w.\-]+)", line)
      branches = re.search(r"branch_computations=\{([^}]*)\}", line)
      if branches:
        conditionals[name].append(re.findall(r"%?([\w.\-]+)", branches.group(1)))

  def total(computation):
    return (own.get(computation, 0) + sum(total(c) for c in called.get(computation, ()))
            + sum(branch(total(b) for b in bs) for bs in conditionals.get(computation, ())))

  return total(entry)


def _measure() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from nonuniform_jax import plan, train  # pylint: disable=g-import-not-at-top

  out = {}
  for name, (overrides, _, _) in CASES.items():
    config = default.get_config()
    for key, value in overrides.items():
      section, field = key.split(".")
      config[section][field] = value
    p = plan.read(config)
    run = train.build(p)
    step = train.jit_train_step(p, run)
    batch = {"inputs": jnp.zeros((config.batch_size,) + tuple(run.datasets.input_shape)),
             "labels": jnp.zeros((config.batch_size,), jnp.int32)}
    # K-FAC's statistics schedule traced (None): both branches are compiled and counted apart.
    compiled = step.lower(run.state, batch, None).compile()
    hlo = compiled.as_text()
    out[name] = {"cheapest": collective_bytes(hlo, branch=min),
                 "dearest": collective_bytes(hlo, branch=max),
                 "all_gather": collective_bytes(hlo, "all-gather"),
                 "grad_bytes": sum(l.size * l.dtype.itemsize
                                   for l in jax.tree.leaves(run.state.params))}
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
  for name, (_, expected, extra) in CASES.items():
    m = measured[name]
    grad = m["grad_bytes"]
    ratio = m["cheapest"] / grad
    note = f"{m['cheapest']} bytes; gradient {grad} bytes"
    if m["dearest"] != m["cheapest"]:
      note += f"; the most expensive step {m['dearest'] / grad:.3g}x ({m['dearest']} bytes)"
    if m["all_gather"]:
      note += f"; all-gather {m['all_gather'] / grad:.3g}x ({m['all_gather']} bytes)"
    rows.append({"benchmark": "all-reduce per step, 8 devices, default MLP", "case": name,
                 "value": ratio, "unit": "x gradient size",
                 "goal": f"~{expected} (+ a few scalars{extra})",
                 "ok": expected <= ratio < expected + 0.05 and not m["all_gather"],
                 "note": note})
  return rows
