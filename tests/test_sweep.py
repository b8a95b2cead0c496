"""The sweep runner: members expanded from data in a fixed order with stable names, sweep.json in
the analysis's layout, a bad member refused before anything runs, a sweep killed mid-way and run
again equal to an uninterrupted one, local workers that share no member, the scripts emitted for
SLURM and TPU VMs, and the paper's sweeps as configs (expanded, validated, a shard run on mock
data). Members are tiny MLPs on the digits: a few steps each."""

import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from nonuniform_jax import plan as plan_lib, sweep, sweep_config, workdir as wd
from nonuniform_jax.analysis import table

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

SWEEP_CONFIG = '''
import ml_collections


def get_config(variant=""):
  s = ml_collections.ConfigDict()
  s.name = "small"
  s.base = "configs/default.py"
  s.overrides = ml_collections.ConfigDict({{
      "dataset": "digits", "model": {{"name": "mlp", "widths": (4,)}}, "num_steps": {steps},
      "log_every": 10, "eval_every": {steps}, "checkpoint_every": 10, "batch_size": 32,
      "train_eval_examples": 64, "eval_batch_size": 400,
      "measures.names": ("lambda_max", "gradient_noise"), "measures.num_examples": 16,
      "measures.batch_size": 8, "measures.settings.lambda_max.num_iters": 3}},
      allow_dotted_keys=True)
  s.one_at_a_time = ({{"optimizer.learning_rate": (0.05,)}},)
  s.grids = {grids}
  s.seeds = (0, 1)
  s.criterion = {{"train_accuracy": 0.0}}
  s.population_cap = 2   # the four members train as two populations (one after the other)
  return s
'''


def write_config(folder, steps=40, grids="()") -> str:
  path = pathlib.Path(folder) / "small_sweep.py"
  path.write_text(SWEEP_CONFIG.format(steps=steps, grids=grids))
  return str(path)


def run(capsys, *args) -> tuple[int, str]:
  status = sweep.command(["nonuniform_jax.sweep", *args])
  return status, capsys.readouterr().out


def members_of(directory) -> list[dict]:
  return json.loads((pathlib.Path(directory) / "sweep.json").read_text())["members"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted sweep of 4 members (the base and one learning rate, two seeds each)."""
  folder = tmp_path_factory.mktemp("reference")
  config = write_config(folder)
  status = sweep.command(["nonuniform_jax.sweep", f"--config={config}",
                          f"--workdir={folder / 'sweep'}"])
  assert status == 0
  return config, folder / "sweep"


# ------------------------------------------------------------------------------ expansion

def _sweep(config: dict):
  fields = {"name": "t", "base": "configs/default.py", **config}
  return sweep_config.from_fields("t", fields)


def test_expansion_one_at_a_time_grids_seeds_and_stable_names():
  s = _sweep({
      "overrides": {"model": {"name": "mlp", "widths": (8,)}, "num_steps": 5},
      "one_at_a_time": ({"optimizer.learning_rate": (0.05, 0.1, 0.3)},   # 0.1 is the base's
                        {"optimizer.name": ("sam", "sam"), "sam.rho": (0.02, 0.2)}),
      "grids": (({"batch_size": (64, 128)}, {"optimizer.learning_rate": (0.1, 0.3)}),
                ({"model": ({"name": "cnn", "channels": (4,), "hidden": 8},)},)),
      "seeds": (3, 4)})
  members = sweep_config.expand(s)
  settings = [{k: v for k, v in m.overrides.items() if k != "seed"} for m in members[::2]]
  assert settings == [
      {},                                                   # the base
      {"optimizer.learning_rate": 0.05}, {"optimizer.learning_rate": 0.3},
      {"optimizer.name": "sam", "sam.rho": 0.02}, {"optimizer.name": "sam", "sam.rho": 0.2},
      # the grid: (128, 0.1) is the base and (128, 0.3) a one-at-a-time point, both dropped
      {"batch_size": 64}, {"batch_size": 64, "optimizer.learning_rate": 0.3},
      {"model": {"name": "cnn", "channels": [4], "hidden": 8}}]   # as JSON reads it
  assert [m.overrides["seed"] for m in members] == [3, 4] * 8
  assert [m.config.seed for m in members] == [3, 4] * 8
  assert members[6].config.sam.rho == 0.02 and members[6].config.optimizer.name == "sam"
  assert members[15].config.model.to_dict() == {"name": "cnn", "channels": (4,), "hidden": 8}
  assert members[0].config.num_steps == 5 and members[0].config.model.widths == (8,)
  for m in members:
    assert m.name == f"{m.index:04d}-{sweep_config.digest(m.overrides)}"
    assert m.workdir == f"members/{m.name}"
  assert [m.name for m in sweep_config.expand(s)] == [m.name for m in members]   # stable
  # The same setting has the same hash wherever it stands: only the index moves.
  fewer = sweep_config.expand(_sweep({"overrides": {"model": {"name": "mlp", "widths": (8,)},
                                             "num_steps": 5},
                               "one_at_a_time": ({"optimizer.learning_rate": (0.3,)},),
                               "seeds": (3, 4)}))
  assert fewer[2].name.split("-")[1] == members[4].name.split("-")[1]
  assert sweep_config.varied_keys(members) == [
      "batch_size", "model.channels", "model.hidden", "model.name", "optimizer.learning_rate",
      "optimizer.name", "sam.rho", "seed"]


@pytest.mark.parametrize("config, message", [
    ({"one_at_a_time": ({"optimizer.learnig_rate": (0.1,)},)},
     "one_at_a_time[0]: unknown setting 'optimizer.learnig_rate' (did you mean "
     "'optimizer.learning_rate'?)"),
    ({"one_at_a_time": ({"optimizer.name": ("sam",), "sam.rho": (0.1, 0.2)},)},
     "one_at_a_time[0]: the keys of one axis vary in step"),
    ({"grids": (({"batch_size": (8,)}, {"batch_size": (16,)}),)},
     "grids[0]: a key is in two of its axes"),
    ({"one_at_a_time": ({"seed": (1, 2)},)}, "one_at_a_time[0]: sets the seed key 'seed'"),
    ({"one_at_a_time": ({"batch_size": (0.5,)},)}, "one_at_a_time[0]: batch_size=0.5:"),
])
def test_malformed_axes_are_refused(config, message):
  with pytest.raises(ValueError) as info:
    sweep_config.expand(_sweep(config))
  assert str(info.value).startswith(message)


def test_partition_gives_every_population_to_one_shard():
  costs = [5.0, 1.0, 3.0, 3.0, 8.0, 1.0, 2.0]
  for count in (1, 2, 3, 7, 9):
    shards = sweep.partition(costs, count)
    assert sorted(j for shard in shards for j in shard) == list(range(len(costs)))
    assert shards == sweep.partition(costs, count)
  # 8 -> 0; 5 -> 1; 3 -> 1; 3 -> 0 (tie); 2 -> 1; 1 -> 1; 1 -> 0 (tie): loads 12 and 11.
  assert sweep.partition(costs, 2) == [[3, 4, 5], [0, 1, 2, 6]]


def test_populations_are_split_evenly_under_the_cap():
  from nonuniform_jax import population   # pylint: disable=g-import-not-at-top
  same = type("Plan", (), {"config": {"a": 1}})()
  other = type("Plan", (), {"config": {"a": 2}})()
  plans = [same] * 5 + [other] + [same] * 2
  assert population.shape_key(same) != population.shape_key(other)
  # Seven alike under a cap of 3: parts of 3, 2 and 2 (not 3, 3 and 1), in order.
  assert sweep.populations(plans, 3) == [[0, 1, 2], [3, 4], [6, 7], [5]]
  assert sweep.populations(plans, 32) == [[0, 1, 2, 3, 4, 6, 7], [5]]


# ----------------------------------------------------------------------- the command line

def test_sweep_json_is_what_the_analysis_reads(reference, capsys):
  config, directory = reference
  rec = json.loads((directory / "sweep.json").read_text())
  assert rec["name"] == "small" and rec["base_config"] == "configs/default.py"
  assert rec["criterion"] == {"train_accuracy": 0.0}
  assert rec["overrides"]["dataset"] == "digits" and rec["overrides"]["num_steps"] == 40
  assert rec["hyperparameters"] == ["optimizer.learning_rate", "seed"]
  names = [m["name"] for m in rec["members"]]
  assert [m["hyperparameters"] for m in rec["members"]] == [
      {"optimizer.learning_rate": rate, "seed": seed} for rate in (0.1, 0.05) for seed in (0, 1)]
  loaded = table.load_table(str(directory))
  assert [r["name"] for r in loaded.rows] == names and not loaded.excluded
  assert loaded.hyperparameters == ("optimizer.learning_rate", "seed")
  assert {"lambda_max/lambda_max", "gradient_noise/trace_sigma"} <= set(loaded.measures)
  assert list(loaded.column("optimizer.learning_rate")) == [0.1, 0.1, 0.05, 0.05]
  for m in rec["members"]:
    config_json = json.loads((directory / m["workdir"] / "config.json").read_text())
    assert config_json["optimizer"]["learning_rate"] == m["hyperparameters"][
        "optimizer.learning_rate"] and config_json["progress"] is False
  # Run again: every member is skipped, and the end says where the results are.
  status, out = run(capsys, f"--config={config}", f"--workdir={directory}")
  assert status == 0
  assert out.splitlines() == [
      "sweep small: 4 members: 0 trained, 4 skipped (finished before), 0 failed; 0 s",
      f"sweep.json: {directory}/sweep.json",
      f"plot: python -m nonuniform_jax.plot --logdir {directory}"]


def one_line_error(capsys, *args) -> str:
  with pytest.raises(SystemExit) as info:
    sweep.command(["nonuniform_jax.sweep", *args])
  assert info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), lines
  return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(reference, tmp_path, capsys):
  config, directory = reference
  bad = write_config(tmp_path, grids="(({'optimizer.learning_rate': (0.2, -1.0)},),)")
  target = tmp_path / "sweep"
  line = one_line_error(capsys, f"--config={bad}", f"--workdir={target}")
  bad_member = sweep_config.expand(sweep_config.read(bad))[6]
  assert line == (f"error: member {bad_member.name} (optimizer.learning_rate=-1.0, seed=0): "
                  "optimizer.learning_rate must be a finite number > 0, got -1.0")
  assert not target.exists()
  assert one_line_error(capsys, f"--config={config}", f"--workdir={target}",
                        "--config.train.num_stepz=3") == (
      "error: unknown setting --config.train.num_stepz: the sweep config has no such key (did "
      "you mean --config.train.num_steps?); every member's settings are under --config.train.")
  assert one_line_error(capsys, f"--config={tmp_path}/none.py", f"--workdir={target}").startswith(
      f"error: cannot load sweep config '{tmp_path}/none.py': no such file")
  # Another sweep in a sweep's directory, and a shard before sweep.json exists.
  assert one_line_error(capsys, f"--config={config}", f"--workdir={directory}",
                        "--config.train.num_steps=20") == (
      f"error: workdir '{directory}' holds another sweep (shared settings num_steps: 40 -> 20); "
      "use another --workdir")
  assert one_line_error(capsys, f"--config={config}", f"--workdir={target}", "--shard=0/2") == (
      f"error: workdir '{target}' holds no sweep.json: run the same command without --shard (or "
      "with --emit) first")
  assert not target.exists()


def _checkpointed(directory: pathlib.Path) -> bool:
  """Whether some unfinished member has a checkpoint."""
  for member in (directory / "members").glob("*"):
    saved = member / "checkpoints"
    if not (member / "summary.json").exists() and saved.exists() and any(
        p.name.isdigit() for p in saved.iterdir()):
      return True
  return False


def test_a_sweep_killed_mid_way_and_run_again_equals_an_uninterrupted_one(reference, tmp_path,
                                                                           capsys):
  """A real SIGKILL of the sweep's process once two members have finished and a third has a
  checkpoint; the same command then skips the finished, resumes the third, trains the rest, and
  every member's metrics.jsonl equals the uninterrupted sweep's."""
  config, expected = reference
  directory = tmp_path / "sweep"
  process = subprocess.Popen([sys.executable, "-m", "nonuniform_jax.sweep", f"--config={config}",
                              f"--workdir={directory}"], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while process.poll() is None and time.time() < deadline:
    if len(list(directory.glob("members/*/summary.json"))) >= 2 and _checkpointed(directory):
      process.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  process.wait()
  assert process.returncode == -signal.SIGKILL, process.stderr.read()[-2000:]
  finished = len(list(directory.glob("members/*/summary.json")))
  assert 2 <= finished < 4
  status, out = run(capsys, f"--config={config}", f"--workdir={directory}")
  assert status == 0
  assert f"4 members: {4 - finished} trained, {finished} skipped (finished before)" in out
  for member in members_of(expected):
    got, want = directory / member["workdir"], expected / member["workdir"]
    assert (got / "metrics.jsonl").read_text() == (want / "metrics.jsonl").read_text(), member
    assert wd.read_json(got / "summary.json")["final"] == wd.read_json(
        want / "summary.json")["final"]
  assert (directory / "sweep.json").read_text() == (expected / "sweep.json").read_text()


def test_two_workers_share_no_member(tmp_path, capfd):
  """Two worker processes, each this command with its shard: every member trained once, by
  one of them (the shards' own lines count their members; the populations' lines name each
  member once)."""
  config = write_config(tmp_path, steps=10)
  directory = tmp_path / "sweep"
  status = sweep.command(["nonuniform_jax.sweep", f"--config={config}",
                          f"--workdir={directory}", "--workers=2"])
  out = capfd.readouterr().out
  assert status == 0, out
  shards = re.findall(r"sweep small \(shard (\d)/2\): (\d) members: (\d) trained, 0 skipped",
                      out)
  assert sorted(s[0] for s in shards) == ["0", "1"], out
  assert sum(int(s[1]) for s in shards) == 4 and all(s[1] == s[2] for s in shards)
  assert "sweep small: 4 members: 4 trained, 0 skipped (finished before), 0 failed" in out
  populations = re.findall(r"population \d/2 \(2 members, (\S+) \.\. (\S+)\): 2 completed",
                           out)
  assert sorted(sum(populations, ())) == sorted(m["name"] for m in members_of(directory))


# ------------------------------------------------------------------------ emitted scripts

def test_emitted_slurm_and_tpu_vm_scripts(reference, tmp_path, capsys):
  """One array task per population (or per shard with --workers), each the same command with
  its shard; one tpu_vm.sh per shard; quoting that survives a value with spaces; the members
  the same as the run's."""
  config, expected = reference
  directory = tmp_path / "sweep dir"
  widths = "--config.train.model.widths=(4, 2)"
  status, out = run(capsys, f"--config={config}", f"--workdir={directory}", "--emit=slurm",
                    widths)
  assert status == 0
  script = (directory / "sweep.sbatch").read_text()
  assert "#SBATCH --array=0-1\n" in script and os.access(directory / "sweep.sbatch", os.X_OK)
  assert f"#SBATCH --output={directory}/slurm-%A_%a.out" in script
  assert f"\ncd {shlex.quote(str(ROOT))}\n" in script
  command = script.strip().splitlines()[-1]
  assert command == ('"${PYTHON:-.venv/bin/python}" -m nonuniform_jax.sweep '
                     f"--config={config} '--workdir={directory}' "
                     "'--config.train.model.widths=(4, 2)' --shard=\"$SLURM_ARRAY_TASK_ID/2\"")
  assert f"sbatch '{directory}/sweep.sbatch'" in out
  assert [m["name"] for m in members_of(directory)] == [m["name"] for m in members_of(expected)]
  # The task's command, as bash reads it: shard 1 of 2.
  words = shlex.split(command.replace("$SLURM_ARRAY_TASK_ID", "1")
                      .replace("${PYTHON:-.venv/bin/python}", "python"))
  assert words[-2:] == ["--config.train.model.widths=(4, 2)", "--shard=1/2"]

  # TPU VMs: the config must lie in the repository (copied to the VMs); two shards.
  shutil_config = ROOT / "configs" / "sweeps" / "test_small_sweep.py"
  shutil_config.write_text(pathlib.Path(config).read_text())
  try:
    status, out = run(capsys, "--config=configs/sweeps/test_small_sweep.py",
                      f"--workdir={directory}", "--emit=tpu_vm", "--workers=2", widths)
    assert status == 0 and "2 VMs, one per shard" in out
    path = directory / "sweep_tpu_vm.sh"
    result = subprocess.run(["bash", str(path)], env={**ENV, "DRY_RUN": "1", "ZONE": "zone-a",
                                                       "LOGS": str(tmp_path / "logs")},
                            capture_output=True, text=True, timeout=120)
  finally:
    shutil_config.unlink()
  assert result.returncode == 0, result.stderr
  assert "2 shards started" in result.stdout
  for i in range(2):
    log = (tmp_path / "logs" / f"shard-{i}.log").read_text().splitlines()
    assert log[0].startswith(f"gcloud compute tpus tpu-vm create nu-small-{i} "
                             "--accelerator-type=v4-8"), log
    last = log[-2] if log[-1].startswith("gcloud compute tpus tpu-vm delete") else log[-1]
    remote = shlex.split(last)[-2].split("--command=", 1)[1]
    words = shlex.split(remote.split("TFDS_DATA_DIR=", 1)[1])
    assert words[1:] == [".venv/bin/python", "-m", "nonuniform_jax.sweep",
                         "--config=configs/sweeps/test_small_sweep.py",
                         f"--workdir={directory}", widths, f"--shard={i}/2"], words


# --------------------------------------------------------------------- the paper's sweeps

PAPER_SWEEPS = {
    "cifar10_cnn_study.py": (64, {"optimizer.learning_rate", "batch_size",
                                  "optimizer.weight_decay", "sam.rho", "augment",
                                  "label_smoothing", "optimizer.name", "model.name",
                                  "model.depth", "model.width", "seed"}),
    "cifar10_vit_study.py": (64, {"optimizer.learning_rate", "batch_size",
                                  "optimizer.weight_decay", "sam.rho", "augment",
                                  "label_smoothing", "optimizer.name", "model.depth",
                                  "model.hidden_size", "seed"}),
    "rho_sensitivity.py:cifar10": (10, {"optimizer.name", "sam.rho", "csam.rho2"}),
    "rho_sensitivity.py:cifar100": (10, {"optimizer.name", "sam.rho", "csam.rho2"}),
    "label_noise.py": (12, {"label_noise.rate", "optimizer.name"}),
    "laptop_study.py": (1088, {"dataset", "model.name", "model.widths", "optimizer.name",
                               "sam.rho", "optimizer.learning_rate", "batch_size",
                               "optimizer.weight_decay", "label_noise.rate", "seed"}),
}


def _members(spec: str):
  return sweep_config.expand(sweep_config.read(f"configs/sweeps/{spec}"))


def _with(spec: str, token: str) -> str:
  return spec + ("," if ":" in spec else ":") + token


@pytest.mark.parametrize("spec", PAPER_SWEEPS)
def test_paper_sweeps_expand_and_their_tiny_variants_are_valid(spec, monkeypatch):
  """The members each sweep promises, at every scale; every tiny member passes plan.read."""
  monkeypatch.chdir(ROOT)
  count, varied = PAPER_SWEEPS[spec]
  members = _members(spec)
  assert len(members) == count and varied <= set(sweep_config.varied_keys(members))
  scales = ("tiny",) if spec.startswith("laptop") else ("tiny", "laptop")
  for scale in scales:
    small = _members(_with(spec, scale))
    if spec.startswith("laptop"):
      assert len(small) == 5
    else:
      assert len(small) == count
      assert sweep_config.varied_keys(small) == sweep_config.varied_keys(members)
  for member in _members(_with(spec, "tiny")):
    plan_lib.read(member.config)
  if not spec.startswith("laptop"):   # the full scale too, one seed (the model is what costs)
    for member in members[::2]:
      plan_lib.read(member.config)


def test_a_paper_sweep_emitted_for_slurm_runs_a_shard_on_mock_data(tmp_path, capsys,
                                                                   monkeypatch):
  """The CNN study at tiny scale, emitted as one task per population (of one member each, by
  ``population_cap=1``): the script's task 63 runs the sweep command with shard 63/64 (read from
  the interpreter it starts), and that command trains its one member (the cheapest: shards take
  the costliest first) under tfds.testing.mock_data."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(ROOT)
  directory = tmp_path / "cnn"
  status, out = run(capsys, "--config=configs/sweeps/cifar10_cnn_study.py:tiny",
                    f"--workdir={directory}", "--emit=slurm", "--config.population_cap=1")
  assert status == 0 and "a job array of 64 tasks, one per population" in out
  shim = tmp_path / "python"   # records the command the task runs
  shim.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$PWD" "$@"\n')
  shim.chmod(0o755)
  result = subprocess.run(["bash", str(directory / "sweep.sbatch")],
                          env={**ENV, "PYTHON": str(shim), "SLURM_ARRAY_TASK_ID": "63"},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  cwd, *argv = result.stdout.splitlines()
  assert cwd == str(ROOT) and argv == [
      "-m", "nonuniform_jax.sweep", "--config=configs/sweeps/cifar10_cnn_study.py:tiny",
      f"--workdir={directory}", "--config.population_cap=1", "--shard=63/64"]
  with tfds.testing.mock_data(num_examples=64):
    status, out = run(capsys, *argv[2:])
  assert status == 0, out
  assert re.search(r"population \d+/64 \(\S+\): 1 completed", out), out
  assert "(shard 63/64): 1 members: 1 trained" in out
  summaries = list(directory.glob("members/*/summary.json"))
  assert len(summaries) == 1
  summary = json.loads(summaries[0].read_text())
  assert summary["status"] == "completed" and summary["config"]["dataset"] == "cifar10"
  assert summary["config"]["optimizer"]["name"] == "sgd" and "gradient_noise" in summary["measures"]


def test_a_stop_while_workers_start_stops_the_ones_started(tmp_path, monkeypatch):
  """SIGTERM arriving while ``--workers`` starts its worker processes is held until the start
  returns, so the worker is in the list the stop is passed to; raised inside the start, it left
  a worker that trained on alone (seen: 24 minutes after its sweep was stopped)."""
  def interrupt(signum, frame):
    raise KeyboardInterrupt("SIGTERM")
  started = []
  real_popen = subprocess.Popen

  def popen_with_a_signal(command, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)   # a handler that runs now interrupts the start halfway
    started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
    return started[-1]

  monkeypatch.setattr(sweep.subprocess, "Popen", popen_with_a_signal)
  args = sweep.Args(spec="configs/sweeps/laptop_study.py:tiny", sweep=None,
                    workdir=str(tmp_path), workers=2, emit=None, shard=None, overrides=())
  previous = signal.signal(signal.SIGTERM, interrupt)
  try:
    with pytest.raises(KeyboardInterrupt):
      sweep._run_workers(args, [], [[0], [1]])
  finally:
    signal.signal(signal.SIGTERM, previous)
    for p in started:
      if p.poll() is None:
        p.kill()
  assert len(started) == 1 and started[0].returncode == -signal.SIGTERM


def test_sigterm_to_a_sweep_with_workers_stops_them_all_in_one_line(tmp_path):
  """SIGTERM to the parent of ``--workers=2`` while both workers train: every process ends
  within seconds, with status 130, one line saying how to resume (the parent's; each worker
  says which population it stopped) and no traceback."""
  config = write_config(tmp_path, steps=100000)
  directory = tmp_path / "sweep"
  command = [sys.executable, "-m", "nonuniform_jax.sweep", f"--config={config}",
             f"--workdir={directory}", "--workers=2"]
  process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 180
  while time.time() < deadline and len(list(directory.glob("members/*/metrics.jsonl"))) < 4:
    assert process.poll() is None, process.communicate()
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  sent = time.time()
  out, err = process.communicate(timeout=60)
  took = time.time() - sent
  workers = subprocess.run(["pgrep", "-f", f"--workdir={directory}"], capture_output=True,
                           text=True).stdout.split()
  for pid in workers:   # (the test's own leftovers, were there any)
    os.kill(int(pid), signal.SIGKILL)
  assert process.returncode == 130, err
  assert not workers and took < 20, (workers, took)
  lines = [line for line in (out + err).splitlines() if line.strip()]
  assert [line for line in lines if line.startswith("error:")] == [
      "error: interrupted; run the same command to resume"], lines
  assert sum(line.endswith(": interrupted") for line in lines) == 2, lines
  assert "Traceback" not in err, err
