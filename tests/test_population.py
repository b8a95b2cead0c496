"""Populations: four members trained at once write what four separate runs write; shape keys;
an interrupted population (with a member already completed and one restarting from scratch)
resumes to the uninterrupted one."""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from configs import default
from nonuniform_jax import checkpoints, measure, plan, population, train

# The four members: seed, learning rate, SAM's ρ, weight decay, label smoothing, the label
# noise (none, or its rate and draw) differ; momentum and weight decay are on in all (the shape
# key).
MEMBERS = (
    {"seed": 0, "label_noise.kind": "none", "label_noise.rate": 0.0, "label_smoothing": 0.1},
    {"seed": 1, "optimizer.learning_rate": 0.05, "label_noise.rate": 0.2},
    {"seed": 2, "sam.rho": 0.1, "optimizer.weight_decay": 5e-4, "data_seed": 7},
    {"seed": 3, "optimizer.weight_decay": 1e-3, "label_noise.rate": 0.4, "data_seed": 7},
)
# One measure of each way the measures take a model: a key (λ_max), the capture pass (tr Σ by
# the fast path), neither (SAM sharpness).
MEASURES = ("lambda_max", "sam_sharpness", "gradient_noise")


def config(**overrides):
  c = default.get_config()
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 10, 10
  c.train_eval_examples, c.eval_batch_size, c.progress = 300, 256, False
  c.model.widths = (16,)
  c.optimizer.name = "sam"
  c.optimizer.weight_decay = 1e-4
  c.label_noise.kind, c.label_noise.rate = "symmetric", 0.1
  c.measures.names, c.measures.num_examples, c.measures.batch_size = MEASURES, 64, 64
  c.measures.settings.lambda_max.num_iters = 20
  c.measures.settings.gradient_noise.method = "fast"
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


def plans():
  return [plan.read(config(**m)) for m in MEMBERS]


def lines(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def params(workdir):
  return checkpoints.read_state(workdir)["params"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("population")
  together = [str(root / f"member{i}") for i in range(len(MEMBERS))]
  alone = [str(root / f"alone{i}") for i in range(len(MEMBERS))]
  summaries = population.train_population(plans(), together)
  separate = [train.train(p, w) for p, w in zip(plans(), alone)]
  return together, alone, summaries, separate


def close(a, b, key):
  # Losses and accuracies within float32 rounding of the separate run's (differences of nearby
  # numbers, as the gaps, absolutely); counts and settings exactly.
  if isinstance(b, float):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key
  else:
    assert a == b, key


def test_members_write_what_separate_runs_write(runs):
  together, alone, summaries, separate = runs
  for member, single, summary, reference in zip(together, alone, summaries, separate):
    assert summary["status"] == reference["status"] == "completed"
    assert summary["population"]["members"] == 4
    assert summary["population"]["index"] == together.index(member)
    assert {"setup", "initialisation", "steps", "evaluation", "measures", "logs",
            "checkpoints"} == set(summary["population"]["seconds"])
    assert set(summary["final"]) == set(reference["final"])
    for key, value in reference["final"].items():
      if "accuracy" in key and "gap" not in key:
        assert summary["final"][key] == value, key
      close(summary["final"][key], value, key)
    assert summary["settings"] == reference["settings"]
    assert summary["dataset"] == reference["dataset"]
    for name in ("config.json", "dataset.json", "label_noise.npz"):
      mine, theirs = pathlib.Path(member, name), pathlib.Path(single, name)
      noisy = member != together[0]   # member 0 has no label noise
      assert mine.exists() == theirs.exists() == (name != "label_noise.npz" or noisy)
      assert not theirs.exists() or mine.read_bytes() == theirs.read_bytes()
    got, want = lines(os.path.join(member, "metrics.jsonl")), lines(
        os.path.join(single, "metrics.jsonl"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [5, 10, 15, 20]
    for g, w in zip(got, want):
      assert set(g) == set(w)
      for key in w:
        close(g[key], w[key], f"step {w['step']} {key}")
    timing = lines(os.path.join(member, "timing.jsonl"))
    assert [set(t) for t in timing] == [set(t) for t in lines(os.path.join(single,
                                                                           "timing.jsonl"))]
    assert sorted(os.listdir(os.path.join(member, "checkpoints"))) == ["10", "20"]
    a, b = params(member), params(single)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                         atol=1e-5 * np.abs(y).max()), a, b)


def test_measures_over_the_population_are_each_members_own(runs):
  together, alone, _, _ = runs
  for member, single in zip(together, alone):
    got, = lines(os.path.join(member, "measures.jsonl"))
    want, = lines(os.path.join(single, "measures.jsonl"))
    assert got["step"] == want["step"] == 20
    assert set(got) == set(want) == {"step", *MEASURES}
    for name in MEASURES:
      for key, value in want[name].items():
        if key != "seconds" and not isinstance(value, (list, dict)):
          close(got[name][key], value, f"{name} {key}")


def test_a_checkpoint_is_the_members_own(runs, tmp_path):
  """A member's checkpoint is what its separate run saves: the same arrays, which the trainer
  resumes (a rerun of the completed member only reports) and the measure command reads."""
  together, alone, summaries, _ = runs
  state, reference = (checkpoints.read_state(w, 10) for w in (together[1], alone[1]))
  assert jax.tree.structure(state) == jax.tree.structure(reference)
  assert train.train(plans()[1], together[1])["final"] == summaries[1]["final"]
  copy = shutil.copytree(together[2], tmp_path / "member2")
  result = measure.measure(str(copy), ["sam_sharpness"], step=20)["sam_sharpness"]
  logged, = lines(os.path.join(together[2], "measures.jsonl"))
  assert result["sharpness"] == pytest.approx(logged["sam_sharpness"]["sharpness"], rel=1e-6)


def test_shape_key_groups_and_separates():
  keys = {population.shape_key(p) for p in plans()}
  assert len(keys) == 1
  first = population.shape_key(plans()[0])
  same = {"progress": True, "overwrite": True, "optimizer.momentum": 0.5,
          "label_smoothing": 0.2, "csam.alpha": 0.5, "label_noise.kind": "none",
          "label_noise.rate": 0.0}
  assert population.shape_key(plan.read(config(**same))) == first
  for other in ({"optimizer.momentum": 0.0}, {"optimizer.weight_decay": 0.0},
                {"model.widths": (8,)}, {"batch_size": 64}, {"optimizer.name": "sgd"},
                {"num_steps": 30}, {"sam.weight_decay_in_perturbation": True}):
    assert population.shape_key(plan.read(config(**other))) != first, other


def test_runs_that_cannot_be_vmapped_train_alone(tmp_path):
  augmented = [plan.read(config(dataset="cifar10", augment=True, seed=s)) for s in (0, 1)]
  assert population.alone(augmented[0]) == "'cifar10' is augmented on the host, batch by batch"
  assert population.shape_key(augmented[0]) != population.shape_key(augmented[1])
  big = plan.read(config(seed=2**31, num_steps=5, log_every=5, eval_every=5,
                         checkpoint_every=5, **{"measures.names": ()}))
  assert population.alone(big) == f"its seed {2**31} is not an int32"
  summary, = population.train_population([big], [str(tmp_path / "big")])
  assert summary["status"] == "completed" and "population" not in summary


def test_members_that_cannot_train_together_are_refused(tmp_path):
  mixed = [plan.read(config()), plan.read(config(**{"model.widths": (8,)}))]
  with pytest.raises(ValueError, match=r"differ in model.widths; only seed, data_seed"):
    population.train_population(mixed, [str(tmp_path / "a"), str(tmp_path / "b")])
  with pytest.raises(ValueError, match="workdirs must differ"):
    population.train_population(plans()[:2], [str(tmp_path / "a")] * 2)
  assert not os.listdir(tmp_path)


def measures_without_seconds(workdir):
  return [{k: {**v, "seconds": 0} if isinstance(v, dict) else v for k, v in r.items()}
          for r in lines(os.path.join(workdir, "measures.jsonl"))]


def test_interrupted_population_resumes_to_the_uninterrupted(runs, tmp_path, monkeypatch):
  """Interrupted after the step-10 checkpoints, then resumed with member 1 restarting from
  scratch (its checkpoints lost: the others wait for it at step 10): every member ends exactly
  as in the uninterrupted population. Then, with members 0, 1 and 3 completed and member 2
  stopped after its last checkpoint (no summary), a rerun trains none of them again."""
  together, _, summaries, _ = runs
  workdirs = [str(tmp_path / f"member{i}") for i in range(len(MEMBERS))]
  record = population._record  # pylint: disable=protected-access

  def interrupting(program, members, states, d, step, *args):
    if step == 15:
      raise KeyboardInterrupt
    return record(program, members, states, d, step, *args)

  monkeypatch.setattr(population, "_record", interrupting)
  with pytest.raises(train.Interrupted, match=r"interrupted at step 15 \(last checkpoint: "
                                              r"step 10\)"):
    population.train_population(plans(), workdirs)
  monkeypatch.setattr(population, "_record", record)
  assert not any(os.path.exists(os.path.join(w, "summary.json")) for w in workdirs)
  assert [r["step"] for r in lines(os.path.join(workdirs[1], "metrics.jsonl"))] == [5, 10]
  shutil.rmtree(os.path.join(workdirs[1], "checkpoints"))

  resumed = population.train_population(plans(), workdirs)
  for i, (workdir, reference) in enumerate(zip(workdirs, together)):
    assert resumed[i]["final"] == summaries[i]["final"]
    assert resumed[i]["population"]["index"] == i
    assert (pathlib.Path(workdir, "metrics.jsonl").read_text()
            == pathlib.Path(reference, "metrics.jsonl").read_text())
    assert measures_without_seconds(workdir) == measures_without_seconds(reference)
    jax.tree.map(np.testing.assert_array_equal, params(workdir), params(reference))

  os.remove(os.path.join(workdirs[2], "summary.json"))
  before = {w: pathlib.Path(w, "summary.json").read_text() for w in workdirs if w != workdirs[2]}
  monkeypatch.setattr(population, "_loop", lambda *a: pytest.fail("retrained"))
  again = population.train_population(plans(), workdirs)
  assert {w: pathlib.Path(w, "summary.json").read_text() for w in before} == before
  assert [s["final"] for s in again] == [s["final"] for s in summaries]
  assert again[2]["population"]["members"] == 1


def test_stretches_end_at_events_and_refresh_steps_alone():
  p = plan.read(config(**{"optimizer.name": "gam", "kfac.stats_every": 4,
                          "kfac.inverse_every": 4}))
  events = population._events(p, 0, 20)  # pylint: disable=protected-access
  assert events == [5, 10, 15, 20]
  stretches = population._stretches(p, 0, 20, events)  # pylint: disable=protected-access
  assert stretches == [(0, 1, True), (1, 4, False), (4, 5, True), (5, 8, False), (8, 9, True),
                       (9, 10, False), (10, 12, False), (12, 13, True), (13, 15, False),
                       (15, 16, False), (16, 17, True), (17, 20, False)]


def test_a_cnn_population_steps_members_one_after_another_and_equals_separate_runs(tmp_path):
  """On a CPU a convolutional model's members step by lax.map inside the compiled step; they
  still write what their separate runs write."""
  def cnn_config(seed, rate):
    c = config(seed=seed, **{"optimizer.learning_rate": rate})
    c.model = {"name": "cnn", "channels": (4,), "hidden": 8}
    c.measures.names = ()
    c.label_noise.kind, c.label_noise.rate = "none", 0.0
    return c
  members = [plan.read(cnn_config(0, 0.1)), plan.read(cnn_config(1, 0.05))]
  assert population.steps_one_after_another(members[0])
  assert not population.steps_one_after_another(plans()[0])
  together = [str(tmp_path / f"member{i}") for i in range(2)]
  population.train_population(members, together)
  for i, p in enumerate(members):
    alone = str(tmp_path / f"alone{i}")
    train.train(p, alone)
    for a, b in zip(jax.tree.leaves(params(together[i])), jax.tree.leaves(params(alone))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for got, want in zip(lines(os.path.join(together[i], "metrics.jsonl")),
                         lines(os.path.join(alone, "metrics.jsonl"))):
      assert set(got) == set(want)
      for key in want:
        if "time" not in key:
          close(got[key], want[key], key)
