"""Several processes on this machine, as on several hosts: ``launch/local_multiprocess.sh``
starts them (a coordinator on a free port, gloo collectives between processes, simulated CPU
devices in each), and they must do what one process does.

In the ordinary suite (about 40 s): the default command (300 steps) in 2 processes of 4 devices
ends with the metrics and parameters of 1 process of 8 (the single process's run of it, which
used to deadlock XLA:CPU's thread pool, is also in tests/test_parallel.py). The full matrix
(``-m multiprocess_full``; CI runs it as its own step): SIGTERM and resumption, SAM, CSAM with
both metrics, fully sharded state, measures, a BatchNorm CNN, the streaming pipeline with each
process reading its own shards, kill -9 of either process, SIGTERM to one process, checkpoints
moving between 2 processes and 1, and a workdir held by another run.

Tolerances: float32 results of 2 processes × 4 devices against 1 process × 8 devices agree to
a relative 1e-5 over up to 300 steps (measured: 6e-8 after 300 SGD steps; gloo sums in another
order than XLA's in-process all-reduce; absolute 1e-6), and 5e-4 (absolute 2e-5, for weights of
about 0.1) over the fault tests' 200 to 400 steps, where part of a run is in each (the
differences grow with the steps: relative 1.1e-4, absolute 5e-6 measured after 360 steps of SGD
at learning rate 0.1).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from nonuniform_jax import checkpoints, workdir as wd

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "local_multiprocess.sh"
RTOL = 1e-5
RTOL_LONG, ATOL_LONG = 5e-4, 2e-5
full = pytest.mark.multiprocess_full
DEFAULT_300 = ("--config.num_steps=300", "--config.checkpoint_every=100", "--config.progress=False")


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "XLA_FLAGS", "PJRT_NPROC"))}
  cache = jax.config.jax_compilation_cache_dir   # the session's (tests/conftest.py)
  env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, JAX_PLATFORMS="cpu",
             **({"JAX_COMPILATION_CACHE_DIR": cache,
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"} if cache else {}))
  env.update(extra)
  return env


def launch(processes: int, devices: int, workdir, *overrides, config="configs/default.py",
           env=None) -> subprocess.Popen:
  """``launch/local_multiprocess.sh`` in the background (its own process group)."""
  return subprocess.Popen(
      ["bash", str(LAUNCHER), str(processes), config, str(workdir), *overrides], cwd=ROOT,
      env=_env(DEVICES_PER_PROCESS=str(devices), **(env or {})), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True)


def single(devices: int, workdir, *overrides, config="configs/default.py",
           env=None) -> subprocess.Popen:
  """One process of the command with ``devices`` simulated devices, in the background."""
  return subprocess.Popen(
      [sys.executable, "-m", "nonuniform_jax.main", f"--config={config}",
       f"--workdir={workdir}", *overrides], cwd=ROOT,
      env=_env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {})),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
  try:
    out, err = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    out, err = process.communicate()
    raise AssertionError(f"still running after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
  return process.returncode, out, err


def completed(process, timeout=300) -> str:
  code, out, err = finish(process, timeout)
  assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
  return out


def wait_for(path: pathlib.Path, process: subprocess.Popen, timeout: float = 240) -> None:
  deadline = time.time() + timeout
  while not path.exists():
    if process.poll() is not None:
      raise AssertionError(f"ended ({process.returncode}) before {path} existed:\n"
                           + "\n".join(process.communicate()))
    assert time.time() < deadline, f"no {path} after {timeout} s"
    time.sleep(0.05)


def trainer_pids(workdir) -> list[int]:
  """The trainer processes of ``workdir``, in process id (JAX_PROCESS_ID) order."""
  found = {}
  for entry in pathlib.Path("/proc").iterdir():
    try:
      cmdline = (entry / "cmdline").read_bytes().split(b"\0")
      environ = (entry / "environ").read_bytes().split(b"\0")
    except OSError:
      continue
    if b"nonuniform_jax.main" in cmdline and f"--workdir={workdir}".encode() in cmdline:
      ids = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"JAX_PROCESS_ID=")]
      found[int(ids[0]) if ids else 0] = int(entry.name)
  return [found[i] for i in sorted(found)]


def read_lines(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def assert_same_run(dir_a, dir_b, rtol=RTOL, atol=1e-6, measures=False):
  """Equal metrics.jsonl (steps, keys, values to ``rtol``) and final parameters."""
  a, b = read_lines(dir_a / "metrics.jsonl"), read_lines(dir_b / "metrics.jsonl")
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert sorted(ra) == sorted(rb)
    for key in ra:
      np.testing.assert_allclose(rb[key], ra[key], rtol=rtol, atol=atol, err_msg=key)
  if measures:
    assert any(k.startswith("measure/") for k in a[-1])
  jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=rtol, atol=atol),
               checkpoints.read_state(str(dir_a))["params"],
               checkpoints.read_state(str(dir_b))["params"])


def one_line_errors(text: str) -> list[str]:
  return [line for line in text.splitlines() if "error" in line.lower()]


def test_default_command_in_two_processes_equals_one(tmp_path):
  """The default command (300 steps) in 2 processes of 4 devices: the metrics and parameters of
  1 process of 8; process 0 alone wrote the logs, both wrote checkpoint shards; one start line
  and one final line, no runtime banners. (It used to hang in the first steps, deaf to
  SIGTERM.)"""
  one = single(8, tmp_path / "one", *DEFAULT_300)
  out = completed(launch(2, 4, tmp_path / "two", *DEFAULT_300))
  completed(one)
  assert out.count("in 2 processes; starting") == 1 and out.count("test accuracy") == 1, out
  assert "[process 1]" not in out and "Gloo" not in out
  assert_same_run(tmp_path / "one", tmp_path / "two")
  workdir = tmp_path / "two"
  assert len(list(workdir.glob("events.out.tfevents*"))) == 1
  for process in (0, 1):
    assert (workdir / "checkpoints" / "300" / "state" / f"ocdbt.process_{process}").is_dir()
  summary = wd.read_json(workdir / "summary.json")
  assert summary["devices"]["num_processes"] == 2 and summary["settings"]["num_devices"] == 8


@full
def test_sigterm_stops_both_and_the_same_command_resumes(tmp_path):
  """SIGTERM to the launcher (which passes it on): both processes stop at the same step after
  the checkpoint, within seconds, status 130; the same command resumes and the run ends as 1
  process of 8 devices does."""
  one = single(8, tmp_path / "one", *DEFAULT_300)
  workdir = tmp_path / "two"
  run = launch(2, 4, workdir, *DEFAULT_300)
  wait_for(workdir / "checkpoints" / "100" / "commit_success.txt", run)
  os.kill(run.pid, signal.SIGTERM)
  sent = time.time()
  code, out, err = finish(run, timeout=60)
  assert code == 130 and time.time() - sent < 20, (code, err[-2000:])
  stopped = [line for line in err.splitlines() if "interrupted at step" in line]
  assert len(stopped) == 2 and stopped[0].split("interrupted at step")[1] == \
      stopped[1].split("interrupted at step")[1], err
  out = completed(launch(2, 4, workdir, *DEFAULT_300))
  assert "in 2 processes; resuming at step 100" in out
  completed(one)
  assert_same_run(tmp_path / "one", workdir)


# The full matrix.

SMALL = ("--config.num_steps=40", "--config.log_every=10", "--config.eval_every=20",
         "--config.checkpoint_every=20", "--config.train_eval_examples=512",
         "--config.progress=False", "--config.model.widths=(32,)")
MEASURED = ("--config.measures.names=('lambda_max','sam_sharpness','gradient_noise',"
            "'wu_nonuniformity')", "--config.measures.every_steps=20",
            "--config.measures.num_examples=256", "--config.measures.batch_size=64",
            "--config.measures.settings.lambda_max.num_iters=20",
            "--config.measures.settings.wu_nonuniformity.num_iters=20")


def _same_in_one_and_two(tmp_path, *overrides, config="configs/default.py", measures=False):
  one = single(8, tmp_path / "one", *overrides, config=config)
  completed(one)
  two = launch(2, 4, tmp_path / "two", *overrides, config=config)
  completed(two)
  assert_same_run(tmp_path / "one", tmp_path / "two", measures=measures)


@full
@pytest.mark.parametrize("overrides", [
    ("--config.optimizer.name=sgd",) + MEASURED,
    ("--config.optimizer.name=sam", "--config.sam.rho=0.1"),
    ("--config.optimizer.name=csam", "--config.csam.metric=identity"),
    ("--config.optimizer.name=csam", "--config.csam.metric=kfac", "--config.kfac.stats_every=5",
     "--config.kfac.inverse_every=10"),
    ("--config.optimizer.name=asam", "--config.sam.rho=0.5", "--config.parallel.fully_sharded=True"),
], ids=["sgd-measures", "sam", "csam-identity", "csam-kfac", "asam-fully-sharded"])
def test_two_processes_equal_one(overrides, tmp_path):
  """Each optimizer's metrics, measures and parameters: 2 × 4 devices as 1 × 8. The measures
  are computed on the global measurement subset (each process on all of it)."""
  _same_in_one_and_two(tmp_path, *SMALL, *overrides, measures="lambda_max" in str(overrides))
  if "gradient_noise" in str(overrides):
    last = read_lines(tmp_path / "two" / "measures.jsonl")[-1]
    assert last["lambda_max"]["num_examples"] == 256


@full
def test_batchnorm_with_synchronised_statistics(tmp_path):
  _same_in_one_and_two(tmp_path, config=str(ROOT / "tests" / "multiprocess_configs.py") + ":bn")


@pytest.fixture(scope="module")
def tiny_food101(tmp_path_factory):
  """A prepared Food-101 of 48 training and 16 validation JPEGs of random sizes (label = index
  mod 101), in TFDS's own file layout: each process reads its own shards of it, which the TFDS
  mock (which ignores split slicing) would not show."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tfds")
  builder = tfds.builder("food101", data_dir=str(root))
  directory = pathlib.Path(builder.data_dir)
  directory.mkdir(parents=True)
  gen = np.random.default_rng(0)
  for split, n, files in (("train", 48, 3), ("validation", 16, 1)):
    for f, ids in enumerate(np.array_split(np.arange(n), files)):
      name = directory / f"food101-{split}.tfrecord-{f:05d}-of-{files:05d}"
      with tf.io.TFRecordWriter(str(name)) as writer:
        for i in ids:
          image = gen.integers(0, 256, tuple(gen.integers(20, 40, 2)) + (3,), np.uint8)
          writer.write(builder.info.features.serialize_example({"image": image,
                                                                "label": int(i % 101)}))
  tfds.folder_dataset.write_metadata(
      data_dir=str(directory), features=builder.info.features, split_infos=None,
      filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
  return root


@full
@pytest.mark.parametrize("subset", [0, 40])
def test_streaming_each_process_its_own_shards(tiny_food101, subset, tmp_path):
  """Food-101 streamed (the whole split, or a 40-example subset): 8 shards, one per device;
  2 processes read 4 each and train on the batches 1 process of 8 devices reads. Measures on
  the global subset gather every process's part."""
  _same_in_one_and_two(
      tmp_path, f"--config.data_dir={tiny_food101}", f"--config.num_train_examples={subset}",
      "--config.measures.names=('lambda_max',)", "--config.measures.num_examples=24",
      "--config.measures.settings.lambda_max.num_iters=10",
      config=str(ROOT / "tests" / "multiprocess_configs.py") + ":food101", measures=True)
  dataset = wd.read_json(tmp_path / "two" / "dataset.json")
  assert dataset["training_shards"] == 8 and dataset["process_count"] == 2


@full
@pytest.mark.parametrize("victim", [1, 0])
def test_kill_9_of_one_process(victim, tmp_path):
  """kill -9 of one process mid-run: the other ends within a bounded time with one line — at
  once when JAX's runtime or gloo notices (always when the coordinator, process 0, was lost;
  status 134), else after 10 s of missing heartbeats (status 69); the launcher run again
  resumes from the last checkpoint and ends as an uninterrupted run."""
  reference = single(8, tmp_path / "reference", *SMALL, "--config.num_steps=200")
  workdir = tmp_path / "two"
  run = launch(2, 4, workdir, *SMALL, "--config.num_steps=200")
  wait_for(workdir / "checkpoints" / "40" / "commit_success.txt", run)
  pids = trainer_pids(workdir)
  assert len(pids) == 2
  os.kill(pids[victim], signal.SIGKILL)
  killed = time.time()
  code, out, err = finish(run, timeout=120)
  took = time.time() - killed
  errors = one_line_errors(err)
  assert len(errors) == 1, err
  watch = "stopped responding" in errors[0] or "lost the coordinator" in errors[0]
  if watch:
    assert took < 20, (took, err)
  else:
    assert "another process of the run was lost" in errors[0] and took < 5, (took, err)
  # (the launcher's status is the first process's: 137, killed, when that is process 0)
  assert code == (137 if victim == 0 else 69 if watch else 134), (code, err)
  print(f"victim {victim}: the other process ended {took:.1f} s after the kill")
  completed(reference)
  out = completed(launch(2, 4, workdir, *SMALL, "--config.num_steps=200"))
  assert "resuming at step" in out
  assert_same_run(tmp_path / "reference", workdir, rtol=RTOL_LONG, atol=ATOL_LONG)


@full
def test_sigterm_to_one_process_stops_both(tmp_path):
  """SIGTERM to process 1 alone (a scheduler preempting one host): both stop at the same step,
  after the checkpoint, with status 130."""
  workdir = tmp_path / "two"
  run = launch(2, 4, workdir, *SMALL, "--config.num_steps=400")
  wait_for(workdir / "checkpoints" / "20" / "commit_success.txt", run)
  os.kill(trainer_pids(workdir)[1], signal.SIGTERM)
  sent = time.time()
  code, _, err = finish(run, timeout=60)
  assert code == 130 and time.time() - sent < 20, err
  stopped = [line.split("interrupted at step")[1] for line in err.splitlines()
             if "interrupted at step" in line]
  assert len(stopped) == 2 and stopped[0] == stopped[1], err


@full
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_checkpoints_move_between_one_and_two_processes(first, then, tmp_path):
  """A run of ``first`` processes (8 devices in all) stopped by SIGTERM resumes on ``then``
  and ends as an uninterrupted run."""
  overrides = (*SMALL, "--config.num_steps=400")
  reference = single(8, tmp_path / "reference", *overrides)
  workdir = tmp_path / "moved"
  start = (launch(2, 4, workdir, *overrides) if first == 2 else single(8, workdir, *overrides))
  wait_for(workdir / "checkpoints" / "40" / "commit_success.txt", start)
  os.killpg(start.pid, signal.SIGTERM)
  assert finish(start, timeout=60)[0] == 130
  completed(reference)
  resume = launch(2, 4, workdir, *overrides) if then == 2 else single(8, workdir, *overrides)
  assert "resuming at step" in completed(resume)
  assert_same_run(tmp_path / "reference", workdir, rtol=RTOL_LONG, atol=ATOL_LONG)


@full
def test_workdir_held_by_another_run(tmp_path):
  """Process 0 takes the lock; when another run holds it, every process refuses in one line
  (exit 2), at once, and nothing waits for a collective."""
  workdir = tmp_path / "held"
  with wd.locked(str(workdir)):
    started = time.time()
    code, out, err = finish(launch(2, 4, workdir, *SMALL), timeout=120)
  assert code == 2 and time.time() - started < 60, err
  refusals = [line for line in err.splitlines()
              if line.removeprefix("[process 1] ").startswith("error:")]
  assert len(refusals) == 2 and all("is in use by another run" in line for line in refusals), err
  assert not (workdir / "config.json").exists() and out == ""
