"""Claiming a workdir: ``prepare(write=False)`` reports what ``prepare`` would and touches
nothing, and in a multi-process run only process 0 writes or removes files."""

import pathlib
import shutil

import jax
from jax.experimental import multihost_utils
import pytest

from nonuniform_jax import workdir as wd

CONFIG = {"seed": 0, "progress": False, "model": {"name": "mlp", "widths": (32,)}}


def _files(root: pathlib.Path) -> dict:
  """{relative path: bytes} of every file under ``root`` ({} when it does not exist)."""
  return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _old_run(root: pathlib.Path, config: dict, status: str) -> None:
  """A workdir as a run of ``config`` leaves it: config, a metrics line, a checkpoint, a summary."""
  wd.prepare(str(root), config, overwrite=False)
  (root / wd.METRICS_FILE).write_text('{"step": 10}\n')
  (root / wd.CHECKPOINT_DIR / "10").mkdir(parents=True)
  (root / wd.CHECKPOINT_DIR / "10" / "state").write_text("weights")
  if status:   # None: interrupted before its summary
    wd.write_json(root / wd.SUMMARY_FILE, {"status": status})


SCENARIOS = {  # name -> (old run: (config, status) or None, new config, overwrite, status)
    "empty": (None, CONFIG, False, "new"),
    "resume, shown differently": ((CONFIG, None), {**CONFIG, "progress": True}, False,
                                  "resume"),
    "completed": ((CONFIG, "completed"), CONFIG, False, "completed"),
    "diverged": ((CONFIG, "diverged"), CONFIG, False, "diverged"),
    "overwrite": ((CONFIG, "completed"), {**CONFIG, "seed": 1}, True, "new"),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_prepare_without_write_reports_the_same_status_and_writes_nothing(name, tmp_path):
  old, config, overwrite, expected = SCENARIOS[name]
  root = tmp_path / "run"
  if old:
    _old_run(root, *old)
  before = _files(root)
  assert wd.prepare(str(root), config, overwrite, write=False) == expected
  assert _files(root) == before and root.exists() == bool(old)
  assert wd.prepare(str(root), config, overwrite) == expected   # what writing reports
  if expected not in ("completed", "diverged"):
    assert wd.read_json(root / wd.CONFIG_FILE)["progress"] == config["progress"]
  if name == "overwrite":
    assert sorted(_files(root)) == [wd.CONFIG_FILE]


def test_prepare_without_write_raises_on_a_different_config(tmp_path):
  _old_run(tmp_path, CONFIG, "completed")
  before = _files(tmp_path)
  with pytest.raises(ValueError, match="seed: 0 -> 1"):
    wd.prepare(str(tmp_path), {**CONFIG, "seed": 1}, overwrite=False, write=False)
  assert _files(tmp_path) == before


def test_a_run_from_before_a_setting_existed_resumes_under_its_default(tmp_path):
  """A config.json without data_seed (written before it existed) is the same config as one with
  data_seed -1, which keeps its meaning; another value is a different config."""
  _old_run(tmp_path, CONFIG, None)
  assert wd.prepare(str(tmp_path), {**CONFIG, "data_seed": -1}, overwrite=False,
                    write=False) == "resume"
  with pytest.raises(ValueError, match="data_seed: -1 -> 3"):
    wd.prepare(str(tmp_path), {**CONFIG, "data_seed": 3}, overwrite=False, write=False)


def test_a_run_from_before_the_kfac_settings_reads_as_the_raw_first_factors(tmp_path):
  """A config.json without kfac.init and kfac.inverse (written before they existed) ran with the
  running factors starting at the first batch factors and the exact inverse: it is that config,
  and the new default (the identity start) is a different one."""
  _old_run(tmp_path, CONFIG, None)
  old = {**CONFIG, "kfac": {"init": "batch", "inverse": "exact"}}
  assert wd.prepare(str(tmp_path), old, overwrite=False, write=False) == "resume"
  with pytest.raises(ValueError, match="kfac.init: 'batch' -> 'identity'"):
    wd.prepare(str(tmp_path), {**CONFIG, "kfac": {"init": "identity", "inverse": "exact"}},
               overwrite=False, write=False)


@pytest.mark.parametrize("process_index", [0, 1])
def test_prepare_once_only_process_0_writes(process_index, tmp_path, monkeypatch):
  barriers = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: process_index)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
  _old_run(tmp_path, CONFIG, "completed")
  before = _files(tmp_path)
  assert wd.prepare_once(str(tmp_path), {**CONFIG, "seed": 1}, overwrite=True) == "new"
  assert barriers == ["workdir read", "workdir prepared"]
  if process_index:
    assert _files(tmp_path) == before
  else:
    assert sorted(_files(tmp_path)) == [wd.CONFIG_FILE]
    assert wd.read_json(tmp_path / wd.CONFIG_FILE)["seed"] == 1


def test_prepare_once_on_one_process_is_prepare(tmp_path, monkeypatch):
  monkeypatch.setattr(multihost_utils, "sync_global_devices",
                      lambda name: pytest.fail(f"barrier {name!r} on one process"))
  _old_run(tmp_path / "a", CONFIG, "diverged")
  shutil.copytree(tmp_path / "a", tmp_path / "b")
  config = {**CONFIG, "seed": 1}
  assert wd.prepare_once(str(tmp_path / "a"), config, True) == wd.prepare(
      str(tmp_path / "b"), config, True)
  assert _files(tmp_path / "a") == _files(tmp_path / "b")
