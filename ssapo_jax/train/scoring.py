"""Batched log-prob scoring outside the train step: reference log-probs and self-annotation.

`make_compute_logps` jits a sharded ``[B, T] -> [B]`` log-prob pass for one model graph and
`compute_logps` runs it over host-local batches of a fixed global size. `cached_pair_logps`
scores both sides of a round's pairs once (TRL's ``precompute_ref_log_probs``) with an on-disk
cache keyed by `params_fingerprint` and `data_fingerprint`.

`Scorer` bundles these for a run: built from the mesh, the pad id and the batch size, it scores
(prompt, response) token lists (`Scorer.sequences`) and tokenised pair datasets
(`Scorer.pairs`), compiling one pass per model graph and shape. With ``packing`` it packs the
sequences of each call into rows of ``pack_length`` tokens (`make_compute_packed_logps`), the
row counts from the train step's ladder (`ssapo_jax.batch.row_buckets`).
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

from ssapo_jax import compilation
from ssapo_jax import sharding as shd
from ssapo_jax.batch import PreferenceBatch, pack_sequence_rows, row_buckets, sequence_sums
from ssapo_jax.checkpoint import params_fingerprint  # re-exported
from ssapo_jax.data.loader import LoaderCursor, PreferenceLoader
from ssapo_jax.data.tokenize import fixed_size_batches, round_up
from ssapo_jax.train.step import DTYPES, _cast_floats, param_shardings, split_model


def make_compute_logps(
  mesh: Mesh,
  graphdef: Any,
  params: Any,
  rest: Any = None,
  *,
  compute_dtype: str = "float32",
  average: bool = False,
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
    compilation.record_program("score", ids.shape)  # once per traced shape
    model = nnx.merge(graphdef, _cast_floats(params, dtype), rest)
    # The mesh as trace context: shard_map'd kernels (splash attention) read it.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return model.sequence_logps(ids, mask, loss_mask, average=average).astype(jnp.float32)

  jitted = jax.jit(
    logps, in_shardings=(p_shard, r_shard, tok, tok, tok), out_shardings=shd.replicated(mesh)
  )

  def logps_fn(params, ids, mask, loss_mask):
    return jitted(params, rest, ids, mask, loss_mask)

  logps_fn.lower = lambda params, ids, mask, loss_mask: jitted.lower(  # what ssapo-plan compiles
    params, jax.eval_shape(lambda r: r, rest), ids, mask, loss_mask
  )
  return logps_fn


PACKED_FIELDS = ("ids", "segment_ids", "positions", "loss_mask", "sequence_index")


def make_compute_packed_logps(
  mesh: Mesh,
  graphdef: Any,
  params: Any,
  rest: Any = None,
  *,
  num_sequences: int,
  compute_dtype: str = "float32",
) -> Callable[..., jax.Array]:
  """Jitted ``fn(params, ids, segment_ids, positions, loss_mask, sequence_index) -> [S]``.

  The packed counterpart of `make_compute_logps`: the token arrays are ``[R, T]`` packed rows
  (`ssapo_jax.batch.pack_sequence_rows`), rows sharded over ``("data", "fsdp")``; the result
  is the replicated ``[num_sequences]`` float32 summed log-probs of each sequence's
  ``loss_mask`` tokens (0 for unused indices). Compiles once per row count.
  """
  dtype = DTYPES[compute_dtype]
  p_shard = param_shardings(params, mesh)
  rest = nnx.State({}) if rest is None else rest
  r_shard = jax.tree.map(lambda _: shd.replicated(mesh), rest)
  tok = NamedSharding(mesh, PartitionSpec(shd.BATCH_AXES))

  def logps(params, rest, ids, segment_ids, positions, loss_mask, sequence_index):
    compilation.record_program("score_packed", ids.shape)  # once per traced shape
    model = nnx.merge(graphdef, _cast_floats(params, dtype), rest)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      token = model.token_logps(ids, segment_ids, positions=positions).astype(jnp.float32)
    return sequence_sums(token * loss_mask[:, 1:], sequence_index[:, 1:], num_sequences)

  jitted = jax.jit(
    logps, in_shardings=(p_shard, r_shard) + (tok,) * 5, out_shardings=shd.replicated(mesh)
  )

  def packed_logps_fn(params, *arrays):
    return jitted(params, rest, *arrays)

  packed_logps_fn.lower = lambda params, *arrays: jitted.lower(  # what ssapo-plan compiles
    params, jax.eval_shape(lambda r: r, rest), *arrays
  )
  return packed_logps_fn


def compute_logps(
  logps_fn: Callable[..., jax.Array],
  params: Any,
  mesh: Mesh,
  sequences: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
  *,
  batch_size: int,
) -> np.ndarray:
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
    raise ValueError(
      f"compute_logps batch_size {batch_size} is not divisible by the {nproc} processes"
    )
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
    yield (
      np.asarray(getattr(b, f"{side}_ids")),
      np.asarray(getattr(b, f"{side}_mask")),
      np.asarray(getattr(b, f"{side}_loss_mask")),
    )


def data_fingerprint(batches: Sequence[PreferenceBatch]) -> str:
  """A short hex key of the token arrays and masks of host-local `PreferenceBatch`es."""
  h = hashlib.sha256()
  for b in batches:
    for side in ("chosen", "rejected"):
      for a in (
        getattr(b, f"{side}_ids"),
        getattr(b, f"{side}_mask"),
        getattr(b, f"{side}_loss_mask"),
      ):
        a = np.ascontiguousarray(np.asarray(a, np.int32))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
  return h.hexdigest()[:16]


def cached_pair_logps(
  logps_fn: Callable[..., jax.Array],
  params: Any,
  mesh: Mesh,
  batches: Sequence[PreferenceBatch],
  *,
  batch_size: int,
  cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Log-probs of the chosen and rejected side of every pair under any model, cached on disk.

  Like TRL's ``precompute_ref_log_probs`` for the reference (the train step then needs no
  second model), and the same pass for the policy and the judge of self-annotation. With ``cache_dir`` the result is stored as
  ``ref_logps-<model>-<data>-p<process>.npz`` keyed by `params_fingerprint` and
  `data_fingerprint`, and reused when both keys match.

  Args:
    logps_fn: from `make_compute_logps`.
    params: the model's parameters.
    mesh: device mesh.
    batches: this host's `PreferenceBatch`es (numpy), in order.
    batch_size: global rows per scoring call.
    cache_dir: where to cache (the round's data directory); None disables caching.

  Returns:
    ``(chosen_logps, rejected_logps)``, numpy ``[N]`` float32 over this host's pairs.
  """
  path = None
  if cache_dir is not None:
    key_m = params_fingerprint(params)
    key_d = data_fingerprint(batches)
    path = os.path.join(
      os.fspath(cache_dir), f"ref_logps-{key_m}-{key_d}-p{jax.process_index()}.npz"
    )
    if os.path.exists(path):
      with np.load(path) as cached:
        return cached["chosen"], cached["rejected"]
  chosen = compute_logps(
    logps_fn, params, mesh, _iter_pair_sides(batches, "chosen"), batch_size=batch_size
  )
  rejected = compute_logps(
    logps_fn, params, mesh, _iter_pair_sides(batches, "rejected"), batch_size=batch_size
  )
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
    packing: pack each call's ``2 * batch_size`` sequences into rows (``data.packing``).
    pack_length: tokens per packed row; None = the call's longest sequence rounded up to
      ``bucket_size`` (a run passes ``data.max_length`` rounded up: one ``T`` for all calls;
      a call with a longer sequence uses that instead).
  """

  mesh: Mesh
  pad_id: int
  batch_size: int
  bucket_size: int = 1
  compute_dtype: str = "float32"
  packing: bool = False
  pack_length: int | None = None
  _fns: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  @classmethod
  def for_experiment(cls, experiment, mesh: Mesh, pad_id: int) -> "Scorer":
    """The scorer a run of ``experiment`` (an `ExperimentConfig`) uses, and `ssapo-plan`
    compiles: calls of the train micro-batch size (`scoring_batch_size`), the data config's
    buckets and packing, the train compute dtype."""
    d = experiment.data
    return cls(
      mesh,
      pad_id,
      scoring_batch_size(experiment.train, mesh),
      bucket_size=d.bucket_size,
      compute_dtype=experiment.train.compute_dtype,
      packing=d.packing,
      pack_length=d.resolved_pack_length,
    )

  def largest_shape(self, max_length: int) -> tuple[int, int]:
    """``(rows, T)`` of the largest call for sequences of at most ``max_length`` tokens: packed,
    the top of the row ladder (`row_buckets`: every sequence in a row of its own) of
    ``pack_length``-token rows; padded, ``batch_size`` rows of ``max_length`` rounded up."""
    longest = round_up(max_length, self.bucket_size)
    if not self.packing:
      return self.batch_size, longest
    rows = row_buckets(self.batch_size, shd.num_batch_shards(self.mesh))[-1]
    return rows, max(self.pack_length or 0, longest)

  def _packed_fn(self, model: nnx.Module):
    """``(packed_logps_fn, params)``, built once per model graph."""
    graphdef, params, rest = split_model(model)
    if ("packed", graphdef) not in self._fns:
      self._fns[("packed", graphdef)] = make_compute_packed_logps(
        self.mesh,
        graphdef,
        params,
        rest,
        num_sequences=2 * self.batch_size,
        compute_dtype=self.compute_dtype,
      )
    return self._fns[("packed", graphdef)], params

  def _packed_scores(self, model: nnx.Module, prompts, responses) -> np.ndarray:
    """``[N]`` float32 log-probs, ``2 * batch_size`` sequences packed per call. Every host packs
    the whole call and feeds its rows; the result is replicated, so nothing is gathered."""
    fn, params = self._packed_fn(model)
    size = 2 * self.batch_size
    n = len(prompts)
    longest = round_up(
      max((len(p) + len(r) for p, r in zip(prompts, responses)), default=1), self.bucket_size
    )
    # A sequence longer than pack_length (prompt + sampled response past max_length) widens
    # the rows of this call instead of failing: one more shape, only when it happens.
    t = max(self.pack_length or 0, longest)
    nproc, out = jax.process_count(), []
    for start in range(0, n, size):
      packed = pack_sequence_rows(
        prompts[start : start + size],
        responses[start : start + size],
        seq_len=t,
        max_sequences=size,
        pad_id=self.pad_id,
        row_multiple=shd.num_batch_shards(self.mesh),
      )
      rows = packed["ids"].shape[0] // nproc
      sl = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
      arrays = shd.global_batch(self.mesh, tuple(packed[k][sl] for k in PACKED_FIELDS))
      out.append(np.asarray(fn(params, *arrays))[: min(size, n - start)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)

  def _split(self, model: nnx.Module):
    """``(logps_fn, params)``; the jitted function is built once per model graph."""
    graphdef, params, rest = split_model(model)
    if graphdef not in self._fns:
      self._fns[graphdef] = make_compute_logps(
        self.mesh, graphdef, params, rest, compute_dtype=self.compute_dtype
      )
    return self._fns[graphdef], params

  def lower(self, model: nnx.Module, max_length: int) -> jax.stages.Lowered:
    """The pass `sequences` and `pairs` run, lowered at `largest_shape` (``model`` may be
    abstract): what `ssapo-plan` compiles. Packed, the packed pass on ``[rows, T]`` rows;
    padded, the ``[batch_size, T]`` pass."""
    rows, seq_len = self.largest_shape(max_length)
    tok = jax.ShapeDtypeStruct(
      (rows, seq_len),
      jnp.int32,
      sharding=NamedSharding(self.mesh, PartitionSpec(shd.BATCH_AXES)),
    )
    fn, params = self._packed_fn(model) if self.packing else self._split(model)
    params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      params,
      param_shardings(params, self.mesh),
    )
    return fn.lower(params, *(tok,) * (len(PACKED_FIELDS) if self.packing else 3))

  def sequences(
    self, model: nnx.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
  ) -> np.ndarray:
    """``[N]`` float32 log-probs of each response given its prompt (unpadded token id lists)."""
    if self.packing:
      return self._packed_scores(
        model, [np.asarray(p) for p in prompts], [np.asarray(r) for r in responses]
      )
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
          ids[j, : len(x)], mask[j, : len(x)], loss_mask[j, len(prompts[i]) : len(x)] = x, 1, 1
        yield ids, mask, loss_mask

    logps_fn, params = self._split(model)
    logps = compute_logps(logps_fn, params, self.mesh, batches(), batch_size=size)
    return gather_batches(logps, size)[: len(prompts)]

  def pairs(
    self,
    model: nnx.Module,
    dataset,
    *,
    cache_dir: str | None = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs ``([N], [N])`` float32 of chosen and rejected under ``model``.

    One pass over a tokenised pair dataset in dataset order; with ``cache_dir`` the result is
    cached there by model and data fingerprints (`cached_pair_logps`).
    """
    if self.packing:
      return self._packed_pairs(model, dataset, cache_dir)
    size = self.batch_size
    loader = PreferenceLoader(
      dataset,
      global_batch_size=size,
      shuffle=False,
      pad_id=self.pad_id,
      bucket_size=self.bucket_size,
      num_hosts=jax.process_count(),
      host_index=jax.process_index(),
    )
    cursors = [LoaderCursor(0, i) for i in range(loader.batches_per_epoch)]
    logps_fn, params = self._split(model)
    chosen, rejected = cached_pair_logps(
      logps_fn,
      params,
      self.mesh,
      [loader.batch_at(c) for c in cursors],
      batch_size=size,
      cache_dir=cache_dir,
    )
    order = np.concatenate([loader.batch_indices(c)[0] for c in cursors])
    out = []
    for values in (chosen, rejected):
      full = np.zeros(len(dataset), np.float32)
      full[order] = gather_batches(values, size)  # the padded copies write equal values
      out.append(full)
    return out[0], out[1]

  def _packed_pairs(self, model: nnx.Module, dataset, cache_dir) -> tuple[np.ndarray, np.ndarray]:
    """`pairs` with packing: chosen then rejected sides in dataset order, cached like
    `cached_pair_logps` (``ref_logps-packed-<model>-<data>.npz``)."""
    cols = {
      k: [np.asarray(x, np.int32) for x in dataset[k]]
      for k in ("prompt_ids", "chosen_ids", "rejected_ids")
    }
    path = None
    if cache_dir is not None:
      h = hashlib.sha256()
      for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
        for x in cols[k]:
          h.update(len(x).to_bytes(4, "little"))
          h.update(x.tobytes())
      _, params, _ = split_model(model)
      path = os.path.join(
        os.fspath(cache_dir),
        f"ref_logps-packed-{params_fingerprint(params)}-{h.hexdigest()[:16]}.npz",
      )
      if os.path.exists(path):
        with np.load(path) as cached:
          return cached["chosen"], cached["rejected"]
    n = len(cols["prompt_ids"])
    scores = self._packed_scores(
      model, cols["prompt_ids"] * 2, cols["chosen_ids"] + cols["rejected_ids"]
    )
    chosen, rejected = scores[:n], scores[n:]
    if path is not None and jax.process_index() == 0:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + ".tmp.npz"
      np.savez(tmp, chosen=chosen, rejected=rejected)
      os.replace(tmp, path)
    return chosen, rejected
