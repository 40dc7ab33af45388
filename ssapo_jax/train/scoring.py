"""Batched log-prob scoring outside the train step: reference log-probs and self-annotation.

`make_compute_logps` jits a sharded ``[B, T] -> [B]`` log-prob pass for one model graph and
`compute_logps` runs it over host-local batches of a fixed global size. `precompute_ref_logps`
scores both sides of a round's pairs once (TRL's ``precompute_ref_log_probs``) with an on-disk
cache keyed by `params_fingerprint` and `data_fingerprint`.

`Scorer` bundles these for a run: built from the mesh, the pad id and the batch size, it scores
(prompt, response) token lists (`Scorer.sequences`) and tokenised pair datasets
(`Scorer.pairs`), compiling one pass per model graph and shape.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssapo_jax import sharding as shd
from ssapo_jax.batch import PreferenceBatch
from ssapo_jax.data.loader import LoaderCursor, PreferenceLoader
from ssapo_jax.data.tokenize import fixed_size_batches, round_up
from ssapo_jax.train.step import DTYPES, _cast_floats, param_shardings, split_model


def make_compute_logps(mesh: Mesh, graphdef: Any, params: Any, rest: Any = None, *,
                       compute_dtype: str = "float32", average: bool = False,
                       ) -> Callable[..., jax.Array]:
  """Jitted, sharded ``logps_fn(params, ids, mask, loss_mask) -> [B] float32``.

  Args:
    mesh: device mesh; sequences are sharded over ``("data", "fsdp")``.
    graphdef: the model graph (``TrainState.graphdef`` or ``split_model(model)[0]``).
    params: parameters (only structure and logical axes are read).
    rest: the model's non-parameter state (``split_model(model)[2]``); None for none.
    compute_dtype: forward dtype (parameters are cast to it).
    average: average instead of sum over ``loss_mask`` tokens.

  Returns:
    A function of ``params``, ``ids``, ``mask``, ``loss_mask`` (each ``[B, T]``, global
    arrays or numpy on one host) giving replicated ``[B]`` float32 log-probs of the tokens
    where ``loss_mask`` is 1, each scored given all earlier tokens.
  """
  dtype = DTYPES[compute_dtype]
  p_shard = param_shardings(params, mesh)
  rest = nnx.State({}) if rest is None else rest
  r_shard = jax.tree.map(lambda _: shd.replicated(mesh), rest)
  tok = NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES))

  def logps(params, rest, ids, mask, loss_mask):
    model = nnx.merge(graphdef, _cast_floats(params, dtype), rest)
    # The mesh as trace context: shard_map'd kernels (splash attention) read it.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return model.sequence_logps(ids, mask, loss_mask, average=average).astype(jnp.float32)

  jitted = jax.jit(logps, in_shardings=(p_shard, r_shard, tok, tok, tok),
                   out_shardings=shd.replicated(mesh))

  def logps_fn(params, ids, mask, loss_mask):
    return jitted(params, rest, ids, mask, loss_mask)

  return logps_fn


def compute_logps(logps_fn: Callable[..., jax.Array], params: Any, mesh: Mesh,
                  sequences: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                  batch_size: int) -> np.ndarray:
  """Summed log-probs of every sequence, batch by batch, as numpy ``[N]`` float32.

  Args:
    logps_fn: from `make_compute_logps`.
    params: the parameters to score with (sharded as the train state's).
    mesh: device mesh.
    sequences: iterable of host-local ``(ids, mask, loss_mask)`` numpy batches, each
      ``[n, T]`` with ``n <= batch_size // num_processes`` rows (a short last batch is padded).
      On several hosts each yields its own rows; the result holds this host's rows.
    batch_size: global rows per call (fixed, so the pass compiles once); must divide over
      ``data * fsdp``.

  Returns:
    ``[N]`` float32 over this host's rows, in input order.
  """
  shd.check_batch_divisible(batch_size, mesh, what="compute_logps batch_size")
  nproc = jax.process_count()
  if batch_size % nproc:
    raise ValueError(f"compute_logps batch_size {batch_size} is not divisible by the "
                     f"{nproc} processes")
  local = batch_size // nproc
  rows = shd.host_batch_rows(mesh, batch_size)
  out = []
  for ids, mask, loss_mask in sequences:
    n = ids.shape[0]
    if n > local:
      raise ValueError(f"compute_logps got a batch of {n} rows per host; at most {local}")
    pad = [(0, local - n), (0, 0)]
    arrays = [np.pad(np.asarray(a, np.int32), pad) for a in (ids, mask, loss_mask)]
    global_arrays = shd.global_batch(mesh, tuple(arrays))
    logps = shd.to_host(logps_fn(params, *global_arrays))  # [batch_size], every row
    out.append(logps[rows][:n])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def _iter_pair_sides(batches: Sequence[PreferenceBatch], side: str):
  for b in batches:
    yield (np.asarray(getattr(b, f"{side}_ids")), np.asarray(getattr(b, f"{side}_mask")),
           np.asarray(getattr(b, f"{side}_loss_mask")))


@jax.jit
def _checksums(x: jax.Array) -> jax.Array:
  """``[2]`` float32: a signed sum and the sum of squares of ``x`` (compiled once per shape)."""
  x = x.astype(jnp.float32).reshape(-1)
  sign = jnp.where(jnp.arange(x.shape[0]) % 3 == 0, -1.0, 1.0)
  return jnp.stack([jnp.sum(x * sign), jnp.sum(x * x)])


def params_fingerprint(params: Any) -> str:
  """A short hex key of a parameter pytree: paths, shapes, dtypes and two checksums per array.

  The checksums (sum and sum of squares with a position-dependent sign pattern, computed on
  device in float32) change with any real weight update without moving the weights to host.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  h = hashlib.sha256()
  for path, x in flat:
    h.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype}".encode())
    h.update(shd.to_host(_checksums(x)).tobytes())
  return h.hexdigest()[:16]


def data_fingerprint(batches: Sequence[PreferenceBatch]) -> str:
  """A short hex key of the token arrays and masks of host-local `PreferenceBatch`es."""
  h = hashlib.sha256()
  for b in batches:
    for side in ("chosen", "rejected"):
      for a in (getattr(b, f"{side}_ids"), getattr(b, f"{side}_mask"),
                getattr(b, f"{side}_loss_mask")):
        a = np.ascontiguousarray(np.asarray(a, np.int32))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
  return h.hexdigest()[:16]


def precompute_ref_logps(logps_fn: Callable[..., jax.Array], ref_params: Any, mesh: Mesh,
                         batches: Sequence[PreferenceBatch], *, batch_size: int,
                         cache_dir: str | os.PathLike | None = None,
                         ) -> tuple[np.ndarray, np.ndarray]:
  """Reference log-probs of the chosen and rejected side of every pair (once per round).

  Like TRL's ``precompute_ref_log_probs``: one scoring pass over the round's pairs so the
  train step needs no second model. With ``cache_dir`` the result is stored as
  ``ref_logps-<model>-<data>-p<process>.npz`` keyed by `params_fingerprint` and
  `data_fingerprint`, and reused when both keys match.

  Args:
    logps_fn: from `make_compute_logps`.
    ref_params: reference-model parameters.
    mesh: device mesh.
    batches: this host's `PreferenceBatch`es (numpy), in order.
    batch_size: global rows per scoring call.
    cache_dir: where to cache (the round's data directory); None disables caching.

  Returns:
    ``(ref_chosen_logps, ref_rejected_logps)``, numpy ``[N]`` float32 over this host's pairs.
  """
  path = None
  if cache_dir is not None:
    key_m = params_fingerprint(ref_params)
    key_d = data_fingerprint(batches)
    path = os.path.join(os.fspath(cache_dir),
                        f"ref_logps-{key_m}-{key_d}-p{jax.process_index()}.npz")
    if os.path.exists(path):
      with np.load(path) as cached:
        return cached["chosen"], cached["rejected"]
  chosen = compute_logps(logps_fn, ref_params, mesh, _iter_pair_sides(batches, "chosen"),
                         batch_size=batch_size)
  rejected = compute_logps(logps_fn, ref_params, mesh, _iter_pair_sides(batches, "rejected"),
                           batch_size=batch_size)
  if path is not None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, chosen=chosen, rejected=rejected)
    os.replace(tmp, path)
  return chosen, rejected


def gather_batches(values: np.ndarray, batch_size: int) -> np.ndarray:
  """Host-local rows of fixed-size global batches ``[num_batches * batch_size / P]`` -> all rows
  in global order ``[num_batches * batch_size]`` (the identity on one process)."""
  nproc = jax.process_count()
  if nproc == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  local = values.reshape(-1, batch_size // nproc)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [proc, batches, local]
  return gathered.transpose(1, 0, 2).reshape(-1)


def scoring_batch_size(config, mesh: Mesh) -> int:
  """Rows per scoring call for train config ``config``: its micro-batch, at least one row per
  batch shard of ``mesh`` (so every device gets rows)."""
  return max(config.micro_batch_size, shd.num_batch_shards(mesh))


@dataclasses.dataclass
class Scorer:
  """Summed response log-probs of any model on ``mesh``, in fixed-size sharded batches.

  Attributes:
    mesh: device mesh; rows are sharded over ``("data", "fsdp")``.
    pad_id: token id used for padding.
    batch_size: global rows per call (divides over ``data * fsdp`` and the processes).
    bucket_size: padded sequence lengths are multiples of this.
    compute_dtype: forward dtype (a key of `DTYPES`).
  """

  mesh: Mesh
  pad_id: int
  batch_size: int
  bucket_size: int = 1
  compute_dtype: str = "float32"
  _fns: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def _split(self, model: nnx.Module):
    """``(logps_fn, params)``; the jitted function is built once per model graph."""
    graphdef, params, rest = split_model(model)
    if graphdef not in self._fns:
      self._fns[graphdef] = make_compute_logps(self.mesh, graphdef, params, rest,
                                               compute_dtype=self.compute_dtype)
    return self._fns[graphdef], params

  def sequences(self, model: nnx.Module, prompts: Sequence[Sequence[int]],
                responses: Sequence[Sequence[int]]) -> np.ndarray:
    """``[N]`` float32 log-probs of each response given its prompt (unpadded token id lists)."""
    size, pad = self.batch_size, self.pad_id
    rows = shd.host_batch_rows(self.mesh, size)

    def batches():
      for chunk, _ in fixed_size_batches(len(prompts), size):
        # T from the whole global batch, so every host builds the same shape.
        t = round_up(max(len(prompts[i]) + len(responses[i]) for i in chunk), self.bucket_size)
        chunk = chunk[rows]  # this host's rows
        ids = np.full((len(chunk), t), pad, np.int32)
        mask, loss_mask = np.zeros_like(ids), np.zeros_like(ids)
        for j, i in enumerate(chunk):
          x = list(prompts[i]) + list(responses[i])
          ids[j, :len(x)], mask[j, :len(x)], loss_mask[j, len(prompts[i]):len(x)] = x, 1, 1
        yield ids, mask, loss_mask

    logps_fn, params = self._split(model)
    logps = compute_logps(logps_fn, params, self.mesh, batches(), batch_size=size)
    return gather_batches(logps, size)[:len(prompts)]

  def pairs(self, model: nnx.Module, dataset, *, cache_dir: str | None = None,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs ``([N], [N])`` float32 of chosen and rejected under ``model``.

    One pass over a tokenised pair dataset in dataset order; with ``cache_dir`` the result is
    cached there by model and data fingerprints (`precompute_ref_logps`).
    """
    size = self.batch_size
    loader = PreferenceLoader(dataset, global_batch_size=size, shuffle=False, pad_id=self.pad_id,
                              bucket_size=self.bucket_size, num_hosts=jax.process_count(),
                              host_index=jax.process_index())
    cursors = [LoaderCursor(0, i) for i in range(loader.batches_per_epoch)]
    logps_fn, params = self._split(model)
    chosen, rejected = precompute_ref_logps(logps_fn, params, self.mesh,
                                            [loader.batch_at(c) for c in cursors],
                                            batch_size=size, cache_dir=cache_dir)
    order = np.concatenate([loader.batch_indices(c)[0] for c in cursors])
    out = []
    for values in (chosen, rejected):
      full = np.zeros(len(dataset), np.float32)
      full[order] = gather_batches(values, size)  # the padded copies write equal values
      out.append(full)
    return out[0], out[1]
