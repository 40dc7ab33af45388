"""A packed 2-round tiny run through `ssapo-train`: how many train-step programs it compiles,
and that a SIGKILLed and resumed run loads every program from the persistent cache.

Slow (several minutes: two and a half tiny runs); the per-step equality of packed and padded
batches is tested in tests/train/test_packing.py, the cache itself in tests/test_compilation.py.
"""

import json
import os

import pytest
from pipeline_runs import losses as _losses
from pipeline_runs import write_config, write_world
from test_run import KILL_POINTS, _kill_when, _run

from ssapo_jax.batch import row_buckets


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return write_world(str(tmp_path_factory.mktemp("world")))


def _stats(out):
  with open(os.path.join(out, "compile_stats-p0.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_packed_run_compiles_the_documented_shapes_and_resume_hits_the_cache(world, tmp_path):
  cache = tmp_path / "jax_cache"  # shared by both runs, as a resumed run shares its own
  extra = f"compilation: {{cache_dir: {cache}, min_compile_time_secs: 0.0}}\n"
  full = str(tmp_path / "full")
  _run(write_config(world, full, str(tmp_path), extra), "data.packing=true")
  stats = _stats(full)
  # 8 pairs per step, 1 micro-batch, 8 batch shards: rows per step in row_buckets(8, 8) =
  # (8, 16), T = max_length 64 rounded up to bucket_size 16.
  documented = {(r, 64) for r in row_buckets(8, 8)}
  shapes = {tuple(s) for s in stats["compile/shapes"]["train_step"]}
  assert shapes <= documented, shapes
  assert stats["compile/cache_misses"] > 0  # the first run filled the cache
  # metrics.jsonl: each train phase names the train-step shapes it compiled, the run the total.
  logged = _records(full)
  train = [r for r in logged if r.get("phase") == "train" and "wall_seconds" in r]
  assert len(train) == 3  # rounds 0, 1, 2
  assert set().union(*(_train_step_shapes(r["compile_shapes"]) for r in train)) == shapes
  (run,) = [r for r in logged if r.get("phase") == "run"]
  assert run["compile_programs"] >= sum(r["compile_programs"] for r in train) > 0
  assert _train_step_shapes(run["compile_shapes"]) == shapes

  out = str(tmp_path / "killed")
  config = write_config(world, out, str(tmp_path), extra)
  ready = KILL_POINTS["during_round1_training"]
  assert _kill_when_packed(config, lambda: ready(out)), "the run ended before the kill point"
  _run(config, "data.packing=true")
  resumed = _stats(out)
  # Every train-step program came from the cache (a program only a resumed run compiles, such
  # as a checkpoint restore's, is not in it: "other" may miss).
  train_step = resumed["compile/by_kind"]["train_step"]
  assert train_step["cache_misses"] == 0, resumed
  assert train_step["cache_hits"] == len(resumed["compile/shapes"]["train_step"]) > 0, resumed
  assert {k for k, v in resumed["compile/by_kind"].items() if v["cache_misses"]} <= {"other"}
  assert _losses(out) == _losses(full)


def _records(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_step_shapes(text):
  """``{(rows, T)}`` of the ``train_step`` part of a ``compile_shapes`` field."""
  for part in text.split("; "):
    kind, *shapes = part.split(" ")
    if kind == "train_step":
      return {tuple(int(d) for d in s.split("x")) for s in shapes}
  return set()


def _kill_when_packed(config, ready):
  # The override travels as an environment-free CLI flag: re-create _kill_when's command.
  import test_run

  original = test_run._cmd
  test_run._cmd = lambda c, *o: original(c, "data.packing=true", *o)
  try:
    return _kill_when(config, ready)
  finally:
    test_run._cmd = original
