"""The library's sharded DPO / robust-DPO train step, driven from your own code on a mesh.

No pipeline, no config files: a `Llama` from `LlamaConfig` (random weights here; `load_hf`
for a checkpoint), a `TrainConfig`, a ``(data, fsdp, tensor)`` mesh over the visible devices,
`create_train_state` (parameters and AdamW state placed on their shardings) and
`make_train_step` (one jitted, sharded, donated step with micro-batching). Your code feeds it
`PreferenceBatch`es: token ids and masks of chosen/rejected sequences, the reference
log-probs, and the follower's atoms, here solved per batch with `follower_atoms` on the
reference margins. ``main`` returns the losses.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/03_sharded_train_step.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ssapo_jax as sj
from ssapo_jax import train as tr


def random_batch(rng: np.random.Generator, batch: int, seq_len: int, prompt_len: int, vocab: int):
  """Chosen and rejected sides ``[B, T]``: ids, attention masks (right padding), loss masks."""

  def side():
    lengths = rng.integers(prompt_len + 2, seq_len + 1, batch)
    mask = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(3, vocab, (batch, seq_len)) * mask
    return ids, mask, mask * (np.arange(seq_len)[None] >= prompt_len)

  return (*side(), *side())


def main(
  *, steps: int = 3, batch: int = 8, seq_len: int = 16, mesh_shape=(2, 2, 2), seed: int = 0
) -> dict:
  """Trains a tiny Llama for ``steps`` robust-DPO steps on a ``mesh_shape`` mesh."""
  beta = 0.1
  model = sj.Llama(
    sj.LlamaConfig(
      vocab_size=64,
      hidden_size=32,
      intermediate_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
    ),
    rngs=nnx.Rngs(seed),
  )
  config = sj.TrainConfig(
    objective="robust",
    beta=beta,
    learning_rate=1e-3,
    global_batch_size=batch,
    micro_batches=2,
    compute_dtype="float32",
    remat="none",
    reference="precomputed",
  )
  data, fsdp, tensor = mesh_shape
  mesh = sj.make_mesh(sj.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
  state = sj.create_train_state(model, config, mesh, num_train_steps=steps)
  step = sj.make_train_step(config, mesh, state)
  # Reference log-probs: the initial policy (a copy: the step donates the state), scored per
  # batch with the library's sharded scorer.
  ref_params = jax.tree.map(jnp.copy, state.params)
  score = tr.make_compute_logps(mesh, state.graphdef, ref_params, state.rest)
  follower = jax.jit(sj.follower_atoms, static_argnames="config")
  dro_config = sj.DroConfig(epsilon=0.01, margin_scale=beta)
  rng = np.random.default_rng(seed)
  rows = sj.host_batch_rows(mesh, batch)  # this process's rows (all of them on one host)
  losses = []
  for _ in range(steps):
    sides = random_batch(rng, batch, seq_len, prompt_len=6, vocab=64)
    ids, mask, loss_mask = (np.concatenate([c, r]) for c, r in zip(sides[:3], sides[3:]))
    ref = np.asarray(score(ref_params, ids, mask, loss_mask))
    ref_c, ref_r = ref[:batch], ref[batch:]
    # The follower on the reference margins (in a real round: the annotating policy's margins).
    atoms = follower(ref_c - ref_r, dro_config)
    local = sj.make_preference_batch(
      *sides,
      ref_chosen_logps=ref_c,
      ref_rejected_logps=ref_r,
      atom_weights=np.asarray(atoms.weights),
      atom_shifts=np.asarray(atoms.shifts),
    )
    local = jax.tree.map(lambda x: x[rows], local)
    state, metrics = step(state, sj.global_batch(mesh, local))
    losses.append(float(metrics["loss"]))
    print(
      f"step {len(losses)}: loss {losses[-1]:.4f}  reward margin "
      f"{float(metrics['rewards/margins']):+.4f}  on {mesh.devices.size} devices"
    )
  return {"losses": losses, "devices": int(mesh.devices.size)}


if __name__ == "__main__":
  main()
