"""Shared test settings: quiet, deterministic, CPU-only."""

import atexit
import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Each distinct program is compiled once per session: tests that build the same train, eval or
# measure step again (an interrupted run and its resumption, one config run twice) load it from
# this session's XLA cache (the whole suite under .ci/run on a 2-core CPU: 588 s before, 549 s
# after; the K-FAC resumption tests: 15 to 8 s each).
# jit's own caches (``_cache_size``, which the no-recompilation tests count) are unaffected, and
# subprocesses (the command-line and 8-device tests) compile for themselves.
_XLA_CACHE = tempfile.mkdtemp(prefix="nonuniform_jax_tests_xla_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
