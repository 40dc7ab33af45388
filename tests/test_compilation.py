"""The persistent compilation cache and the compile counter (ssapo_jax/compilation.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssapo_jax import compilation


@pytest.fixture
def fresh_cache():
  yield
  jax.config.update("jax_compilation_cache_dir", None)
  from jax._src import compilation_cache

  compilation_cache.reset_cache()


def test_second_process_like_compile_hits_the_cache_and_is_counted(tmp_path, fresh_cache):
  cfg = compilation.CompilationConfig(min_compile_time_secs=0.0)
  path = compilation.enable_cache(cfg, str(tmp_path))
  assert path == os.path.join(str(tmp_path), "jax_cache")
  compilation.reset_stats()

  def f(x):
    compilation.record_program("f", x.shape)
    return jnp.sin(x) * 3.0 + 1.2345  # a program no other test compiles

  x = np.ones((7, 3), np.float32)  # numpy: no other program (jnp.ones) is compiled
  jax.jit(f)(x)
  first = compilation.stats()
  assert first["compile/programs"] >= 1 and first["compile/cache_misses"] >= 1
  assert first["compile/cache_hits"] == 0
  assert os.listdir(path)  # written to the persistent cache
  jax.clear_caches()  # what a new process starts with: no in-memory executables
  compilation.reset_stats()
  jax.jit(f)(x)
  second = compilation.stats()
  assert second["compile/cache_hits"] >= 1 and second["compile/cache_misses"] == 0
  assert second["compile/shapes"] == {"f": [[7, 3]]}
  assert second["compile/by_kind"]["f"] == {"programs": 1, "cache_hits": 1, "cache_misses": 0}
  assert first["compile/by_kind"]["f"]["cache_misses"] == 1
  compilation.write_stats(str(tmp_path / "s.json"))
  with open(tmp_path / "s.json") as f:
    assert json.load(f)["compile/cache_hits"] >= 1


def test_config_validation():
  with pytest.raises(ValueError, match="local directory"):
    compilation.CompilationConfig(cache_dir="gs://bucket/cache")
  with pytest.raises(ValueError, match="min_compile_time_secs"):
    compilation.CompilationConfig(min_compile_time_secs=-1)
  assert compilation.cache_dir_for(compilation.CompilationConfig(), "/r") == "/r/jax_cache"


def test_compile_delta_and_format_shapes():
  before = {
    "compile/programs": 2,
    "compile/cache_hits": 1,
    "compile/cache_misses": 1,
    "compile/shapes": {"train_step": [[8, 64]]},
  }
  after = {
    "compile/programs": 5,
    "compile/cache_hits": 3,
    "compile/cache_misses": 2,
    "compile/shapes": {"train_step": [[8, 64], [16, 64], [16, 64]], "score": [[4, 128]]},
  }
  after["compile/by_kind"] = {"score": {"programs": 1, "cache_hits": 1, "cache_misses": 0}}
  delta = compilation.compile_delta(before, after)
  assert delta == {
    "compile/programs": 3,
    "compile/cache_hits": 2,
    "compile/cache_misses": 1,
    "compile/shapes": {"train_step": [[16, 64], [16, 64]], "score": [[4, 128]]},
  }
  assert compilation.format_shapes(delta["compile/shapes"]) == "score 4x128; train_step 16x64"
  assert compilation.format_shapes(after["compile/shapes"]) == "score 4x128; train_step 8x64 16x64"
  assert compilation.format_shapes({}) == ""
