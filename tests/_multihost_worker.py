"""Shared tiny fixtures for the train tests, and the worker of the two-process test.

As a script (one per process)::

    python tests/_multihost_worker.py --process_id 0 --num_processes 2 \
        --coordinator localhost:PORT --out result.json

runs `run_steps` on a (2, 2, 2) mesh spanning both processes (4 simulated CPU devices each,
gloo collectives), each process loading only its rows of every global batch, and writes
its losses and reference log-probs as JSON. With ``--task sample`` it instead samples
`sampler_prompts` with `ssapo_jax.sampling.Sampler` on that mesh and writes the prompts this
process sampled and the gathered samples; with ``--task check_run --config_text T`` it runs
`ssapo_jax.pipeline.hosts.check_same_run(T)` and writes the error it raised (or null); with
``--task place --mesh 1,8,1`` it places `tiny_model`'s parameters on a mesh that splits them
across the processes and writes what `place_task` reads back.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

NUM_STEPS = 3
MESH_SHAPE = (2, 2, 2)
GLOBAL_BATCH = 8
SEQ_LEN = 16
PROMPT_LEN = 6
NUM_ATOMS = 3


def tiny_model_config(**overrides):
  from ssapo_jax.models import LlamaConfig

  kwargs = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
  )
  kwargs.update(overrides)
  return LlamaConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides):
  from flax import nnx

  from ssapo_jax.models import Llama

  return Llama(tiny_model_config(**overrides), rngs=nnx.Rngs(seed))


def make_batch(
  seed: int,
  *,
  batch_size: int = GLOBAL_BATCH,
  seq_len: int = SEQ_LEN,
  num_atoms: int = NUM_ATOMS,
  vocab: int = 64,
):
  """A numpy `PreferenceBatch` with right padding, random weights, ref log-probs and atoms."""
  import numpy as np

  from ssapo_jax.batch import make_preference_batch

  rng = np.random.default_rng(seed)

  def side():
    ids = rng.integers(1, vocab, (batch_size, seq_len))
    lengths = rng.integers(PROMPT_LEN + 2, seq_len + 1, batch_size)
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = mask * (np.arange(seq_len)[None] >= PROMPT_LEN)
    return ids * mask, mask, loss_mask

  atom_weights = rng.dirichlet(np.ones(num_atoms), batch_size).astype(np.float32)
  atom_shifts = rng.uniform(0.0, 0.3, (batch_size, num_atoms)).astype(np.float32)
  atom_shifts[:, 0] = 0.0
  return make_preference_batch(
    *side(),
    *side(),
    weights=rng.uniform(0.2, 2.0, batch_size),
    ref_chosen_logps=rng.normal(-25.0, 3.0, batch_size),
    ref_rejected_logps=rng.normal(-25.0, 3.0, batch_size),
    atom_weights=atom_weights,
    atom_shifts=atom_shifts,
  )


def train_config(**overrides):
  from ssapo_jax.train import TrainConfig

  kwargs = dict(
    learning_rate=1e-2,
    warmup_ratio=0.25,
    schedule="cosine",
    weight_decay=0.1,
    max_grad_norm=0.5,
    global_batch_size=GLOBAL_BATCH,
    micro_batches=2,
    compute_dtype="float32",
    remat="none",
    beta=0.2,
  )
  kwargs.update(overrides)
  return TrainConfig(**kwargs)


def run_steps(mesh, config, *, num_steps: int = NUM_STEPS, num_train_steps: int = 4, model=None):
  """Trains ``model`` (default: a fresh `tiny_model`) for ``num_steps`` on batches
  ``make_batch(0..)``.

  Every process passes only its rows of each global batch. Returns ``(losses, state)``.
  """
  import jax

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr

  model = tiny_model() if model is None else model
  state = tr.create_train_state(model, config, mesh, num_train_steps=num_train_steps)
  step = tr.make_train_step(config, mesh, state)
  rows = shd.host_batch_rows(mesh, config.global_batch_size)
  losses = []
  for i in range(num_steps):
    local = jax.tree.map(lambda x: x[rows], make_batch(i))
    state, metrics = step(state, shd.global_batch(mesh, local))
    losses.append(float(metrics["loss"]))
  return losses, state


def sampler_prompts(num: int = 13, seed: int = 0) -> list[list[int]]:
  """Prompts of 2..16 tokens for the sampler tests (one padded length with bucket size 16)."""
  import numpy as np

  rng = np.random.default_rng(seed)
  return [rng.integers(3, 64, int(rng.integers(2, 17))).tolist() for _ in range(num)]


def sampler(mesh, **overrides):
  """The tests' `Sampler`: 2 samples of 6 tokens per prompt, batches of 8, bucket size 16."""
  from ssapo_jax.sampling import Sampler, SamplingConfig

  config = SamplingConfig(
    **{**dict(temperature=1.0, max_new_tokens=6, num_samples=2, batch_size=8), **overrides}
  )
  return Sampler(mesh, config, pad_token_id=0, eos_token_ids=(2,), bucket_size=16)


def sharded_tiny_model(mesh, seed: int = 0):
  """`tiny_model` with its parameters in the train layout on ``mesh``."""
  from flax import nnx

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr

  graphdef, params, rest = nnx.split(tiny_model(seed), nnx.Param, ...)
  return nnx.merge(graphdef, shd.shard_params(params, tr.param_shardings(params, mesh)), rest)


def _sample_task(mesh) -> dict:
  import jax

  from ssapo_jax.sampling import gather_samples

  prompts = sampler_prompts()
  out = sampler(mesh).sample(sharded_tiny_model(mesh), prompts, jax.random.key(7))
  gen = gather_samples(out, len(prompts))
  return {
    "prompt_index": out.prompt_index.tolist(),
    "local_rows": int(out.tokens.shape[0]),
    "tokens": gen.tokens.tolist(),
    "logps": gen.logps.tolist(),
    "new_tokens": out.stats.new_tokens,
  }


def place_task(mesh) -> dict:
  """Parameters split across processes: placed from host values, re-placed as the global arrays
  they now are (`shard_params` must not fetch them), resharded to the decode layout, read back
  with `to_host`, and turned into a train state (`create_train_state` of a model whose
  parameters are global: the crash they once caused)."""
  import jax
  import numpy as np
  from flax import nnx

  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr

  graphdef, host, rest = nnx.split(tiny_model(3), nnx.Param, ...)
  host = jax.tree.map(np.asarray, host)
  shardings = tr.param_shardings(host, mesh)
  placed = shd.shard_params(host, shardings)
  # Parts held by the other process only: neither readable here alone nor a full copy.
  split = [not (x.is_fully_addressable or x.is_fully_replicated) for x in jax.tree.leaves(placed)]
  again = shd.shard_params(placed, shardings)
  same_objects = all(a is b for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(again)))
  from ssapo_jax.models import logical_axes

  decode = shd.logical_shardings(host, logical_axes(host), mesh, rules=shd.DECODE_AXIS_RULES)
  moved = shd.shard_params(placed, decode)
  moved_ok = all(
    x.sharding.is_equivalent_to(s, x.ndim)
    for x, s in zip(jax.tree.leaves(moved), jax.tree.leaves(decode))
  )
  read = shd.to_host(moved)
  state = tr.create_train_state(
    nnx.merge(graphdef, placed, rest), train_config(), mesh, num_train_steps=2
  )
  state_read = shd.to_host(state.params)
  return {
    "split": int(sum(split)),
    "leaves": len(split),
    "same_objects": same_objects,
    "resharded": moved_ok,
    "sums": [float(np.sum(x, dtype=np.float64)) for x in jax.tree.leaves(read)],
    "state_sums": [float(np.sum(x, dtype=np.float64)) for x in jax.tree.leaves(state_read)],
    "expected": [float(np.sum(x, dtype=np.float64)) for x in jax.tree.leaves(host)],
  }


def run_two_processes(out_dir, *task_args: str, timeout: float = 240) -> list[dict]:
  """Runs this file as processes 0 and 1 of one job (4 simulated CPU devices each, coordinator
  on localhost) with ``task_args``; returns the JSON each wrote, or fails with its output."""
  import socket
  import subprocess

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  outs = [os.path.join(out_dir, f"p{i}.json") for i in range(2)]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.abspath(__file__),
        *task_args,
        "--process_id",
        str(i),
        "--num_processes",
        "2",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--out",
        outs[i],
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(2)
  ]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=timeout)[0].decode(errors="replace"))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = []
  for path in outs:
    with open(path) as f:
      results.append(json.load(f))
  return results


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--process_id", type=int, required=True)
  parser.add_argument("--num_processes", type=int, required=True)
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--task", choices=("train", "sample", "check_run", "place"), default="train")
  parser.add_argument(
    "--mesh",
    default=",".join(map(str, MESH_SHAPE)),
    help="data,fsdp,tensor sizes of the mesh over both processes",
  )
  parser.add_argument("--config_text", default="")
  args = parser.parse_args(argv)

  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax
  import numpy as np

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from ssapo_jax import sharding as shd
  from ssapo_jax import train as tr

  mesh_config = shd.MeshConfig(
    *map(int, args.mesh.split(",")),
    coordinator_address=args.coordinator,
    num_processes=args.num_processes,
    process_id=args.process_id,
  )
  assert shd.initialize_distributed(mesh_config)
  mesh = shd.make_mesh(mesh_config)
  if args.task == "check_run":
    from ssapo_jax.pipeline import hosts

    try:
      hosts.check_same_run(args.config_text)
      error = None
    except RuntimeError as e:
      error = str(e)
    with open(args.out, "w") as f:
      json.dump({"error": error}, f)
    jax.distributed.shutdown()
    return
  if args.task == "place":
    with open(args.out, "w") as f:
      json.dump(place_task(mesh), f)
    jax.distributed.shutdown()
    return
  if args.task == "sample":
    result = _sample_task(mesh)
    result.update(process_count=jax.process_count(), devices=jax.device_count())
    with open(args.out, "w") as f:
      json.dump(result, f)
    jax.distributed.shutdown()
    return
  losses, state = run_steps(mesh, train_config())

  # Score this host's rows of two batches with the trained parameters.
  logps_fn = tr.make_compute_logps(mesh, state.graphdef, state.params, state.rest)
  rows = shd.host_batch_rows(mesh, GLOBAL_BATCH)
  batches = [make_batch(10 + i) for i in range(2)]
  seqs = [(b.chosen_ids[rows], b.chosen_mask[rows], b.chosen_loss_mask[rows]) for b in batches]
  logps = tr.compute_logps(logps_fn, state.params, mesh, seqs, batch_size=GLOBAL_BATCH)
  with open(args.out, "w") as f:
    json.dump(
      {
        "losses": losses,
        "rows": [rows.start, rows.stop],
        "logps": np.asarray(logps).tolist(),
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
      },
      f,
    )
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
