"""Peak host and device memory of `load_hf` (onto a mesh) and `save_hf` (from it), on CPU.

Writes a random Llama checkpoint of a few hundred MB, then measures in a fresh process each:

* ``load``: ``load_hf(path, mesh=mesh)`` on 8 simulated CPU devices (fsdp=4, tensor=2);
* ``load_then_shard``: the pre-sharding way for comparison (``load_hf(path)`` onto one device,
  then ``ssapo_jax.sharding.shard_params``);
* ``save``: ``save_hf`` of the mesh-loaded model.

Host memory: the rise of the peak resident set (``resource.getrusage(...).ru_maxrss``) over
the process before the call (on CPU it includes the device buffers, which live in host RAM),
and the transient host peak: the ``tracemalloc`` peak of Python/numpy allocations minus what is
still allocated at the end (numpy blocks that became CPU device buffers without a copy).
Device memory: the largest total bytes of live ``jax.Array`` shards on any one device
(``jax.live_arrays()``), sampled after every parameter is placed or written, and the largest
single shard.

    python benchmarks/loading.py                 # hidden 1024, 6 layers, vocab 32K (~570 MB)
    python benchmarks/loading.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DEVICES = 8


def _device_bytes():
  """(largest per-device total, largest single shard) over live arrays, in bytes."""
  import jax

  buffers = {}  # (device, buffer address) -> bytes: views of one buffer count once
  for x in jax.live_arrays():
    for shard in x.addressable_shards:
      buffers[(shard.device, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
  per_device = {}
  for (device, _), n in buffers.items():
    per_device[device] = per_device.get(device, 0) + n
  return max(per_device.values(), default=0), max(buffers.values(), default=0)


def _measure(mode: str, path: str) -> dict:
  """Runs one measurement in this (fresh) process."""
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_DEVICES}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import tracemalloc

  import jax

  from ssapo_jax import sharding as shd
  from ssapo_jax.models import params as params_lib

  mesh = shd.make_mesh(shd.MeshConfig(fsdp=4, tensor=2))
  peak = {"device": 0, "shard": 0}

  def sample():
    total, largest = _device_bytes()
    peak["device"] = max(peak["device"], total)
    peak["shard"] = max(peak["shard"], largest)

  if mode == "save":
    model = params_lib.load_hf(path, mesh=mesh)
  # Sample the device memory after each parameter is placed (load) or fetched (save).
  place = jax.make_array_from_callback
  params_lib.jax.make_array_from_callback = lambda *a, **k: (sample(), place(*a, **k), sample())[1]
  host_block = params_lib._host_block
  params_lib._host_block = lambda *a: (sample(), host_block(*a))[1]
  put = jax.device_put

  def device_put(*a, **k):
    out = put(*a, **k)
    sample()
    return out

  jax.device_put = device_put
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  tracemalloc.start()
  t0 = time.perf_counter()
  if mode == "load":
    model = params_lib.load_hf(path, mesh=mesh)
  elif mode == "load_then_shard":
    from flax import nnx

    from ssapo_jax.models import logical_axes

    model = params_lib.load_hf(path)
    sample()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shardings = shd.logical_shardings(params, logical_axes(params), mesh)
    params = shd.shard_params(params, shardings)
    model = nnx.merge(graphdef, params, rest)
  elif mode == "save":
    params_lib.save_hf(model, tempfile.mkdtemp())
  seconds = time.perf_counter() - t0
  kept, traced = tracemalloc.get_traced_memory()
  sample()
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  # On CPU a device buffer may be the numpy block itself (zero copy): what is still allocated
  # at the end is such device memory; the peak above it was transient host memory.
  return {
    "mode": mode,
    "seconds": seconds,
    "host_rss_rise_bytes": rss - rss0,
    "host_tracemalloc_peak_bytes": traced,
    "host_tracemalloc_end_bytes": kept,
    "host_transient_peak_bytes": traced - kept,
    "device_peak_bytes": peak["device"],
    "largest_shard_bytes": peak["shard"],
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--hidden", type=int, default=1024)
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--json", default=None)
  p.add_argument("--measure", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.measure:
    print(json.dumps(_measure(*args.measure)))
    return

  import jax
  from flax import nnx

  from ssapo_jax.models import Llama, LlamaConfig, save_hf

  path = tempfile.mkdtemp()
  config = LlamaConfig(
    vocab_size=args.vocab,
    hidden_size=args.hidden,
    intermediate_size=int(args.hidden * 2.75),
    num_layers=args.layers,
    num_heads=args.hidden // 64,
    num_kv_heads=args.hidden // 128,
    head_dim=64,
  )
  model = Llama(config, rngs=nnx.Rngs(0))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  largest = max(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  save_hf(model, path)
  del model
  print(
    f"# {time.strftime('%Y-%m-%d')} jax={jax.__version__} {_DEVICES} CPU devices, "
    f"model {nbytes / 2**20:.0f} MiB float32 (largest parameter {largest / 2**20:.0f} MiB)"
  )
  results = {"model_bytes": nbytes, "largest_param_bytes": largest, "runs": []}
  for mode in ("load", "load_then_shard", "save"):
    out = subprocess.run(
      [sys.executable, __file__, "--measure", mode, path],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    results["runs"].append(r)
    mib = lambda k: r[k] / 2**20
    print(
      f"{mode:16s} {r['seconds']:6.1f}s  host rss +{mib('host_rss_rise_bytes'):6.0f} MiB  "
      f"tracemalloc peak {mib('host_tracemalloc_peak_bytes'):4.0f} (end {mib('host_tracemalloc_end_bytes'):4.0f}) MiB  "
      f"device peak {mib('device_peak_bytes'):6.0f} MiB  "
      f"largest shard {mib('largest_shard_bytes'):5.0f} MiB",
      flush=True,
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
