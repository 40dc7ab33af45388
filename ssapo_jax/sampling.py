"""Batched sampling from a causal LM (`ssapo_jax.models.CausalLM`) with a KV cache, jitted end to end.

`generate` prefills one batch of left-padded prompts, then runs a ``lax.while_loop`` over the
cache that samples one token per step (greedy, temperature, top-k, top-p) and exits early when
every row has emitted an end-of-sequence token.

`Sampler` samples many prompts on a device mesh: prompts are grouped into length-bucketed
batches (`plan_batches`), each batch is sharded over the batch axes ``(data, fsdp)`` with the
attention heads, MLP and vocabulary over ``tensor``, the parameters are laid out for decoding
once per call (`sharding.DECODE_AXIS_RULES`: tensor-parallel, no FSDP gathers inside the loop),
and each process feeds only its rows of every batch and reads back only its rows.

All randomness comes from the ``key`` argument: sample ``j`` of the prompt with global index
``i`` draws step ``t`` with ``fold_in(fold_in(fold_in(key, i), j), t)``. The samples of a prompt
therefore depend on the key, its index and its padded length only, not on the other prompts of
its batch, the mesh or the number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from ssapo_jax import compilation
from ssapo_jax import sharding as shd
from ssapo_jax.data.tokenize import left_pad, round_up
from ssapo_jax.fielddocs import document_fields
from ssapo_jax.models import CausalLM, attention, logical_axes, split_params
from ssapo_jax.models.llama import positions_from_mask


@document_fields
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a round samples responses (the ``sampling`` section of an experiment config)."""

  temperature: float = 0.7  # softmax temperature; 0 = greedy
  top_p: float = 1.0  # nucleus mass kept (1 = off)
  top_k: int = 0  # keep the k most likely tokens (0 = off)
  max_new_tokens: int = 300  # response length limit, tokens
  num_samples: int = 2  # independent responses per prompt
  batch_size: int = 8  # prompts per `generate` call
  # Up to this many consecutive batches of one padded length decode as one queue with
  # batch_size * num_samples rows in flight, an ended row taking the next sample (refill);
  # 1 = each batch alone. Samples do not change; each queue size is one more compile.
  refill_batches: int = 1

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
    for name in ("max_new_tokens", "num_samples", "batch_size", "refill_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"sampling.{name} must be >= 1, got {getattr(self, name)}")


class Generation(NamedTuple):
  """Sampled responses; rows are prompt-major (prompt b's samples at rows b*S .. b*S+S-1).

  Attributes:
    tokens: ``[B*S, max_new_tokens]`` int32, ``pad_token_id`` after the end.
    mask: ``[B*S, max_new_tokens]`` int32, 1 up to and including the EOS token.
    logps: ``[B*S, max_new_tokens]`` float32 log-probability of each token under the model
      (temperature 1, no top-k/top-p), 0 where ``mask`` is 0.
  """

  tokens: jax.Array
  mask: jax.Array
  logps: jax.Array


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf. ``logits [..., V]`` float32.

  Top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``
  (always at least one), as transformers' ``TopPLogitsWarper``; top-k is applied first.
  """
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = (mass_before < top_p).at[..., 0].set(True)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    keep = logits >= cutoff
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def _sample(logits, keys, *, temperature, top_k, top_p):
  """Next tokens ``[R]`` int32 from ``logits [R, V]`` float32, row r drawn with ``keys[r]``."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  draw = lambda k, row: jax.random.categorical(k, row)
  return jax.vmap(draw)(keys, logits).astype(jnp.int32)


def decode_dtype(param_dtype, compute_dtype):
  """The dtype a parameter is decoded in: floating parameters in the compute dtype.

  The model casts every weight to the compute dtype where it uses it, so casting once before
  the sampling loop gives the same samples bit for bit.
  """
  return compute_dtype if jnp.issubdtype(param_dtype, jnp.floating) else param_dtype


class _Settings(NamedTuple):
  """Static arguments of `_generate` (hashable)."""

  max_new_tokens: int
  temperature: float
  top_p: float
  top_k: int
  num_samples: int
  eos_token_ids: tuple[int, ...]
  pad_token_id: int
  rows: int = 0  # rows in flight with refill (`_refill_loop`); 0 = every row at once


def _constrain(mesh, x, logical_axes):
  """``x`` laid out by the logical axes on ``mesh``; unchanged without a mesh."""
  if mesh is None:
    return x
  spec = shd.logical_to_spec(logical_axes, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


@functools.partial(jax.jit, static_argnames=("graphdef", "settings", "mesh"))
def _generate(
  graphdef,
  params,
  rest,
  prompt_ids,
  prompt_mask,
  prompt_index,
  key,
  *,
  settings: _Settings,
  mesh=None,
):
  """The sampling loop. Returns ``(Generation, decode steps run)``; rows prompt-major.

  With a ``mesh`` the rows, the KV cache ``[L, B, K, S, H]`` (batch over ``(data, fsdp)``, kv
  heads over ``tensor``) and the outputs are constrained to it; the parameters keep the layout
  they arrive in, which stays fixed for the whole loop. The mesh is also the trace context, so
  the prefill's attention kernel is the one for the mesh's platform (splash on TPU, under
  ``shard_map`` over the mesh; `ssapo_jax.models.attention`).
  """
  loop = _refill_loop if settings.rows else _sample_loop
  compilation.record_program("sample", prompt_ids.shape)  # once per traced shape
  if mesh is None:
    return loop(graphdef, params, rest, prompt_ids, prompt_mask, prompt_index, key, settings, None)
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return loop(graphdef, params, rest, prompt_ids, prompt_mask, prompt_index, key, settings, mesh)


def _sample_loop(
  graphdef, params, rest, prompt_ids, prompt_mask, prompt_index, key, settings, mesh
):
  """`_generate`'s body (traced under its mesh context)."""
  s = settings
  model: CausalLM = nnx.merge(graphdef, params, rest)
  b, prompt_len = prompt_ids.shape
  rows, n = b * s.num_samples, s.max_new_tokens

  def per_row(x):  # [B, ...] -> [B*S, ...], prompt-major, without moving rows across shards
    x = jnp.broadcast_to(x[:, None], (b, s.num_samples) + x.shape[1:])
    return x.reshape((rows,) + x.shape[2:])

  by_row = lambda x: _constrain(mesh, x, ("batch",) + (None,) * (x.ndim - 1))
  ids = by_row(per_row(prompt_ids.astype(jnp.int32)))
  mask = by_row(per_row(prompt_mask.astype(jnp.int32)))
  sample_index = jnp.tile(jnp.arange(s.num_samples, dtype=jnp.int32), b)
  row_keys = jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(key, i), j))(
    per_row(prompt_index.astype(jnp.int32)), sample_index
  )
  cache_layout = lambda c: jax.tree.map(
    lambda x: _constrain(mesh, x, ("layers", "batch", "kv_heads", None, "head_dim")), c
  )
  cache = cache_layout(model.init_cache(rows, prompt_len + n))
  kv_mask = by_row(jnp.concatenate([mask, jnp.zeros((rows, n), jnp.int32)], axis=1))
  logits, cache = model.prefill(ids, positions_from_mask(mask), cache, kv_mask=kv_mask)
  eos = jnp.asarray(s.eos_token_ids if s.eos_token_ids else (-1,), jnp.int32)
  last_logits = lambda x: by_row(x.astype(jnp.float32))  # [B*S, V], full vocabulary per row

  init = dict(
    step=jnp.zeros((), jnp.int32),
    logits=last_logits(logits),
    cache=cache_layout(cache),
    kv_mask=kv_mask,
    pos=jnp.sum(mask, axis=-1).astype(jnp.int32),  # [B*S] next RoPE position
    done=jnp.zeros((rows,), bool),
    tokens=by_row(jnp.full((rows, n), s.pad_token_id, jnp.int32)),
    mask=by_row(jnp.zeros((rows, n), jnp.int32)),
    logps=by_row(jnp.zeros((rows, n), jnp.float32)),
  )

  def cond(c):
    return (c["step"] < n) & ~jnp.all(c["done"])

  def body(c):
    step = c["step"]
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    token = _sample(c["logits"], step_keys, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    live = ~c["done"]
    logp = jnp.take_along_axis(jax.nn.log_softmax(c["logits"], axis=-1), token[:, None], axis=-1)[
      :, 0
    ]
    token = jnp.where(live, token, s.pad_token_id)
    done = c["done"] | (live & jnp.isin(token, eos))
    slot = prompt_len + step
    kv_mask = jax.lax.dynamic_update_slice_in_dim(
      c["kv_mask"], jnp.ones((rows, 1), jnp.int32), slot, axis=1
    )
    logits, cache = model.decode(
      token[:, None], c["pos"][:, None], c["cache"], cache_index=slot, kv_mask=kv_mask
    )
    col = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v[:, None], step, axis=1)
    return dict(
      step=step + 1,
      logits=last_logits(logits[:, -1]),
      cache=cache_layout(cache),
      kv_mask=kv_mask,
      pos=c["pos"] + 1,
      done=done,
      tokens=col(c["tokens"], token),
      mask=col(c["mask"], live.astype(jnp.int32)),
      logps=col(c["logps"], jnp.where(live, logp, 0.0)),
    )

  out = jax.lax.while_loop(cond, body, init)
  gen = Generation(by_row(out["tokens"]), by_row(out["mask"]), by_row(out["logps"]))
  return gen, out["step"]


# With refill, ended rows take new prompts once at least this share of the rows in flight
# (and at least one) has ended, or all have: each refill is a prefill of every row's slot.
REFILL_SHARE = 0.25


def _refill_loop(
  graphdef, params, rest, prompt_ids, prompt_mask, prompt_index, key, settings, mesh
):
  """`_sample_loop` with ``settings.rows`` rows in flight over a queue of all the prompts'
  samples (jobs, prompt-major): a row whose response ended takes the next job, so no row
  decodes past its end while jobs wait. Returns ``(Generation, decode steps run)``.

  Each row keeps its own step count, RoPE position and cache slots (``Llama.decode`` with a
  ``[rows]`` cache index); a job's draws use its key and its own step, its prompt sits at
  slots ``0 .. P - 1`` and its tokens after, as in `_sample_loop`. Rows are independent in
  every computation of a step, so a job's samples equal `_sample_loop`'s with the same
  padded length (``tests/test_sampling.py`` checks it bit for bit on CPU).

  The loop is two ``while_loop``s: decode steps until `REFILL_SHARE` of the rows (or all) have
  ended, then one refill: the next prompts are prefilled (all ``rows`` slots, same shapes
  as the first prefill) and written into the ended rows' prompt slots, the others kept.
  """
  s = settings
  model: CausalLM = nnx.merge(graphdef, params, rest)
  num_prompts, prompt_len = prompt_ids.shape
  rows, n, jobs = s.rows, s.max_new_tokens, num_prompts * s.num_samples
  refill_at = max(1, int(REFILL_SHARE * rows))
  by_row = lambda x: _constrain(mesh, x, ("batch",) + (None,) * (x.ndim - 1))
  cache_layout = lambda c: jax.tree.map(
    lambda x: _constrain(mesh, x, ("layers", "batch", "kv_heads", None, "head_dim")), c
  )
  queue_ids, queue_mask = prompt_ids.astype(jnp.int32), prompt_mask.astype(jnp.int32)
  prompt_index = prompt_index.astype(jnp.int32)
  eos = jnp.asarray(s.eos_token_ids if s.eos_token_ids else (-1,), jnp.int32)

  def job_keys(job):  # [rows] keys of jobs (prompt-major: job = prompt * S + sample)
    prompt, sample = job // s.num_samples, job % s.num_samples
    return jax.vmap(lambda i, j: jax.random.fold_in(jax.random.fold_in(key, i), j))(
      prompt_index[prompt], sample
    )

  def start(c, new, job):
    """Prefills jobs ``job`` into the rows where ``new`` [rows] holds; other rows unchanged."""
    prompt = jnp.clip(job // s.num_samples, 0, num_prompts - 1)
    ids, mask = by_row(queue_ids[prompt]), by_row(queue_mask[prompt])
    kv_mask = jnp.concatenate([mask, jnp.zeros((rows, n), jnp.int32)], axis=1)
    logits, fresh = model.prefill(
      ids, positions_from_mask(mask), model.init_cache(rows, prompt_len), kv_mask=kv_mask
    )
    keep = lambda a, b: jnp.where(new.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    def merge(old, x):  # the new rows' prompt slots, in place
      head = jax.lax.slice_in_dim(old, 0, prompt_len, axis=3)
      x = jnp.where(new[None, :, None, None, None], x.astype(old.dtype), head)
      return jax.lax.dynamic_update_slice_in_dim(old, x, 0, axis=3)

    return dict(
      c,
      cache=cache_layout(jax.tree.map(merge, c["cache"], fresh)),
      logits=by_row(keep(logits.astype(jnp.float32), c["logits"])),
      kv_mask=by_row(keep(kv_mask, c["kv_mask"])),
      pos=keep(jnp.sum(mask, axis=-1).astype(jnp.int32), c["pos"]),
      t=keep(jnp.zeros((rows,), jnp.int32), c["t"]),
      job=keep(job, c["job"]),
      keys=keep(job_keys(job), c["keys"]),
      done=keep(jnp.zeros((rows,), bool), c["done"]),
    )

  first = jnp.arange(rows, dtype=jnp.int32)
  init = dict(
    steps=jnp.zeros((), jnp.int32),
    next_job=jnp.minimum(rows, jobs).astype(jnp.int32),
    cache=cache_layout(model.init_cache(rows, prompt_len + n)),
    logits=by_row(jnp.zeros((rows, model.config.vocab_size), jnp.float32)),
    kv_mask=by_row(jnp.zeros((rows, prompt_len + n), jnp.int32)),
    pos=jnp.zeros((rows,), jnp.int32),
    t=jnp.zeros((rows,), jnp.int32),
    job=first,
    keys=job_keys(first),
    done=first >= jobs,  # rows beyond the jobs stay idle
    tokens=jnp.full((jobs, n), s.pad_token_id, jnp.int32),
    mask=jnp.zeros((jobs, n), jnp.int32),
    logps=jnp.zeros((jobs, n), jnp.float32),
  )
  init = start(init, first < jobs, first)

  def step(c):
    t = c["t"]
    step_keys = jax.vmap(jax.random.fold_in)(c["keys"], t)
    token = _sample(c["logits"], step_keys, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    live = ~c["done"]
    logp = jnp.take_along_axis(jax.nn.log_softmax(c["logits"], axis=-1), token[:, None], axis=-1)[
      :, 0
    ]
    token = jnp.where(live, token, s.pad_token_id)
    done = c["done"] | (live & (jnp.isin(token, eos) | (t + 1 >= n)))
    slot = prompt_len + jnp.minimum(t, n - 1)  # an ended row rewrites its last slot
    kv_mask = c["kv_mask"].at[jnp.arange(rows), slot].set(1)
    logits, cache = model.decode(
      token[:, None], c["pos"][:, None], c["cache"], cache_index=slot, kv_mask=kv_mask
    )
    at = (jnp.where(live, c["job"], jobs), jnp.minimum(t, n - 1))  # ended rows: dropped
    put = lambda a, v: a.at[at].set(v, mode="drop")
    return dict(
      c,
      steps=c["steps"] + 1,
      logits=by_row(logits[:, -1].astype(jnp.float32)),
      cache=cache_layout(cache),
      kv_mask=by_row(kv_mask),
      pos=c["pos"] + live,
      t=t + live,
      done=done,
      tokens=put(c["tokens"], token),
      mask=put(c["mask"], jnp.ones((rows,), jnp.int32)),
      logps=put(c["logps"], logp),
    )

  def decode_until_refill(c):
    ended = lambda c: jnp.sum(c["done"])
    waiting = c["next_job"] < jobs
    return jax.lax.while_loop(
      lambda c: ~jnp.all(c["done"]) & ~(waiting & (ended(c) >= refill_at)), step, c
    )

  def refill(c):
    idle = c["done"]
    job = c["next_job"] + jnp.cumsum(idle).astype(jnp.int32) - 1
    new = idle & (job < jobs)
    c = jax.lax.cond(jnp.any(new), lambda c: start(c, new, job), lambda c: c, c)  # not at the end
    return dict(c, next_job=c["next_job"] + jnp.sum(new).astype(jnp.int32))

  out = jax.lax.while_loop(
    lambda c: ~jnp.all(c["done"]) | (c["next_job"] < jobs),
    lambda c: refill(decode_until_refill(c)),
    init,
  )
  gen = Generation(by_row(out["tokens"]), by_row(out["mask"]), by_row(out["logps"]))
  return gen, out["steps"]


def _settings(
  config,
  *,
  max_new_tokens,
  temperature,
  top_p,
  top_k,
  num_samples,
  eos_token_ids,
  pad_token_id,
  rows=0,
) -> _Settings:
  """Validated `_Settings`; EOS and pad ids default to the model config's."""
  if eos_token_ids is None:
    eos_token_ids = config.eos_token_ids
  elif isinstance(eos_token_ids, (int, np.integer)):
    eos_token_ids = (int(eos_token_ids),)
  eos_token_ids = tuple(int(e) for e in eos_token_ids)
  if pad_token_id is None:
    pad_token_id = (
      config.pad_token_id
      if config.pad_token_id is not None
      else eos_token_ids[0]
      if eos_token_ids
      else 0
    )
  if (
    temperature < 0
    or not 0 < top_p <= 1
    or top_k < 0
    or max_new_tokens < 1
    or num_samples < 1
    or (rows or 0) < 0
  ):
    raise ValueError(
      f"generate: invalid sampling arguments temperature={temperature}, "
      f"top_p={top_p}, top_k={top_k}, max_new_tokens={max_new_tokens}, "
      f"num_samples={num_samples}, rows={rows}"
    )
  return _Settings(
    int(max_new_tokens),
    float(temperature),
    float(top_p),
    int(top_k),
    int(num_samples),
    eos_token_ids,
    int(pad_token_id),
    int(rows or 0),
  )


def generate(
  model: CausalLM,
  prompt_ids,
  prompt_mask,
  key: jax.Array,
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_p: float = 1.0,
  top_k: int = 0,
  num_samples: int = 1,
  eos_token_ids: Sequence[int] | int | None = None,
  pad_token_id: int | None = None,
  prompt_index=None,
  rows: int | None = None,
) -> Generation:
  """Samples ``num_samples`` continuations of each left-padded prompt (one batch, plain jit).

  Args:
    model: the policy.
    prompt_ids: ``[B, P]`` int32 prompts, left-padded.
    prompt_mask: ``[B, P]`` 1 on real tokens (every row needs at least one).
    key: PRNG key; the same key gives the same samples.
    max_new_tokens: response length limit N.
    temperature: 0 for greedy decoding.
    top_p, top_k: nucleus / top-k filtering (1.0 / 0 = off).
    num_samples: S independent samples per prompt.
    eos_token_ids: tokens that end a response (default: the model config's).
    pad_token_id: filler after the end (default: config pad, else the first EOS, else 0).
    prompt_index: ``[B]`` int the prompts' indices that seed their keys (default ``0..B-1``).
    rows: decode at most this many rows at once (None: all ``B*S``). Fewer rows than
      ``B*S`` refill: a row whose response ended takes the next prompt's sample
      (`_refill_loop`), with the same samples as decoding every row at once.

  Returns:
    `Generation` with ``[B*S, N]`` arrays, prompt-major rows.
  """
  settings = _settings(
    model.config,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_p=top_p,
    top_k=top_k,
    num_samples=num_samples,
    eos_token_ids=eos_token_ids,
    pad_token_id=pad_token_id,
    rows=rows if rows and rows < prompt_ids.shape[0] * num_samples else 0,
  )
  if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
    raise ValueError(
      f"generate: prompt_ids {prompt_ids.shape} and prompt_mask "
      f"{prompt_mask.shape} must both be [B, P]"
    )
  if not isinstance(prompt_mask, jax.core.Tracer):
    m = np.asarray(prompt_mask)
    if (np.diff(m, axis=1) < 0).any():
      raise ValueError("generate: prompts must be left-padded (found a 0 after a 1 in prompt_mask)")
    if (m.sum(axis=1) == 0).any():
      raise ValueError("generate: every prompt needs at least one real token")
  if prompt_index is None:
    prompt_index = np.arange(prompt_ids.shape[0], dtype=np.int32)
  graphdef, params, rest = split_params(model)
  gen, _ = _generate(
    graphdef,
    params,
    rest,
    jnp.asarray(prompt_ids),
    jnp.asarray(prompt_mask),
    jnp.asarray(prompt_index, jnp.int32),
    key,
    settings=settings,
  )
  return gen


# ------------------------------------------------------------------------------ many prompts


def decode_layout(model: CausalLM, mesh, *, abstract: bool = False) -> tuple[Any, Any, Any]:
  """``(graphdef, params, rest)`` of ``model`` for decoding on ``mesh``: parameters placed by
  `DECODE_AXIS_RULES`, in the compute dtype (`decode_dtype`); the one place that layout is built.

  One all-gather of the FSDP shards per call; decoding then reads the local copies. Each
  device holds ``1 / tensor`` of the model: for a bfloat16 run with float32 master weights,
  half of what the float32 copies would take, and half the bytes each decode step reads. With
  ``abstract`` (``model`` may be abstract too), ``jax.ShapeDtypeStruct`` leaves with those
  shardings, nothing allocated.
  """
  graphdef, params, rest = split_params(model)
  p_shard = shd.logical_shardings(params, logical_axes(params), mesh, rules=shd.DECODE_AXIS_RULES)
  r_shard = jax.tree.map(lambda _: shd.replicated(mesh), rest)
  cast = lambda x: x.astype(decode_dtype(x.dtype, model.config.dtype))  # noqa: E731
  to_layout = lambda p, r: (jax.tree.map(cast, p), r)  # noqa: E731
  if abstract:
    shapes = jax.eval_shape(to_layout, params, rest)
    params, rest = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, (p_shard, r_shard)
    )
    return graphdef, params, rest
  params, rest = jax.jit(to_layout, out_shardings=(p_shard, r_shard))(params, rest)
  return graphdef, params, rest


class PromptBatch(NamedTuple):
  """One `generate` call of a sampling plan.

  Attributes:
    indices: ``[B]`` global indices of the prompts; rows past ``num_real`` repeat the last
      real prompt (same index, so the same samples: they never lengthen the loop).
    num_real: how many leading rows are distinct prompts.
    length: padded prompt length P (the longest prompt rounded up to the bucket size).
  """

  indices: np.ndarray
  num_real: int
  length: int


def plan_batches(
  lengths: Sequence[int], *, batch_size: int, bucket_size: int = 1, bucketed: bool = True
) -> list[PromptBatch]:
  """Groups prompts into fixed-size batches for sampling.

  Bucketed, prompts are ordered by length (longest first, so an out-of-memory batch fails
  first; ties keep their order) before they are cut into batches, so a short prompt is padded
  only to its batch neighbours' length. Unbucketed, batches follow the input order. The plan
  depends only on ``lengths`` and the arguments, so every process computes the same one.
  """
  lengths = np.asarray(lengths, np.int64)
  if batch_size < 1 or bucket_size < 1:
    raise ValueError(
      f"plan_batches: batch_size {batch_size} and bucket_size {bucket_size} must be >= 1"
    )
  if lengths.size and lengths.min() < 1:
    raise ValueError(f"plan_batches: prompt {int(np.argmin(lengths))} is empty")
  order = np.argsort(-lengths, kind="stable") if bucketed else np.arange(lengths.size)
  plan = []
  for start in range(0, lengths.size, batch_size):
    chunk = order[start : start + batch_size]
    filler = np.full(batch_size - chunk.size, chunk[-1])
    plan.append(
      PromptBatch(
        np.concatenate([chunk, filler]),
        int(chunk.size),
        round_up(int(lengths[chunk].max()), bucket_size),
      )
    )
  return plan


def prompt_padding_fraction(plan: Sequence[PromptBatch], lengths: Sequence[int]) -> float:
  """Fraction of the prompt positions a plan computes that are padding (filler rows included)."""
  lengths = np.asarray(lengths, np.int64)
  real = sum(int(lengths[b.indices[: b.num_real]].sum()) for b in plan)
  slots = sum(b.indices.size * b.length for b in plan)
  return 1.0 - real / max(slots, 1)


@dataclasses.dataclass
class RolloutStats:
  """Work of one `Sampler.sample` call, summed over all processes.

  Token counts are per sampled row (a prompt counts ``num_samples`` times); slots are the
  positions computed: prefill ``rows * P`` plus one per row and decode step.
  """

  prompts: int = 0
  rows: int = 0  # rows computed, filler included
  prompt_tokens: int = 0
  new_tokens: int = 0  # generated tokens of real rows, EOS included
  prompt_slots: int = 0
  decode_slots: int = 0
  seconds: float = 0.0
  devices: int = 1

  @property
  def padding_fraction(self) -> float:
    """Share of the computed token positions that carry no real token."""
    real = self.prompt_tokens + self.new_tokens
    return 1.0 - real / max(self.prompt_slots + self.decode_slots, 1)

  @property
  def tokens_per_second_per_chip(self) -> float:
    return self.new_tokens / max(self.seconds, 1e-9) / self.devices


class Samples(NamedTuple):
  """This process's share of a `Sampler.sample` call; prompt-major rows, ascending prompts.

  Attributes:
    prompt_index: ``[m]`` int64 global indices of the prompts this process sampled.
    tokens: ``[m*S, N]`` int32, pad after the end.
    mask: ``[m*S, N]`` int32, 1 up to and including the EOS token.
    logps: ``[m*S, N]`` float32 log-probabilities (temperature 1), 0 where ``mask`` is 0.
    stats: the call's `RolloutStats` (global).
  """

  prompt_index: np.ndarray
  tokens: np.ndarray
  mask: np.ndarray
  logps: np.ndarray
  stats: RolloutStats


def _sum_over_processes(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(values)).sum(axis=0)


class Sampler:
  """Samples many prompts on a mesh, each process doing its share of every batch.

  Args:
    mesh: the device mesh; batches are split over ``data * fsdp`` (which must be a multiple
      of the number of processes), heads/MLP/vocabulary over ``tensor``.
    config: `SamplingConfig` (limits, filtering, samples per prompt, prompts per batch B,
      which must divide over ``data * fsdp``).
    pad_token_id, eos_token_ids: the tokenizer's.
    bucket_size: padded prompt lengths are multiples of this (``data.bucket_size``).
    bucketed: order prompts by length before batching (`plan_batches`).

  Samples of a prompt are the same for the same key whatever the mesh and process count
  (with the same ``config.batch_size``, which fixes the batches and so the padded lengths).
  """

  def __init__(
    self,
    mesh,
    config: SamplingConfig,
    *,
    pad_token_id: int,
    eos_token_ids: Sequence[int] | int,
    bucket_size: int = 1,
    bucketed: bool = True,
  ):
    ways, nproc = shd.num_batch_shards(mesh), jax.process_count()
    if ways % nproc:
      raise ValueError(
        f"sampling splits batches over data*fsdp = {ways} ways, which must be a "
        f"multiple of the {nproc} processes (mesh {dict(mesh.shape)})"
      )
    shd.check_batch_divisible(config.batch_size, mesh, what="sampling.batch_size")
    self.mesh, self.config = mesh, config
    self.pad_token_id = int(pad_token_id)
    self.eos_token_ids = (
      (int(eos_token_ids),)
      if isinstance(eos_token_ids, (int, np.integer))
      else tuple(int(e) for e in eos_token_ids)
    )
    self.bucket_size, self.bucketed = bucket_size, bucketed

  def decode_layout(self, model: CausalLM, *, abstract: bool = False) -> tuple[Any, Any, Any]:
    """`decode_layout` of ``model`` on this sampler's mesh."""
    return decode_layout(model, self.mesh, abstract=abstract)

  def settings(
    self,
    model: CausalLM,
    *,
    temperature: float | None = None,
    num_samples: int | None = None,
    batches: int = 1,
  ) -> _Settings:
    """The static settings of `_generate` for ``model`` (the config's, or these overrides) on
    a call of ``batches`` batches (more than one: a refill queue, `SamplingConfig`)."""
    c = self.config
    num_samples = c.num_samples if num_samples is None else num_samples
    return _settings(
      model.config,
      max_new_tokens=c.max_new_tokens,
      temperature=c.temperature if temperature is None else temperature,
      top_p=c.top_p,
      top_k=c.top_k,
      num_samples=num_samples,
      eos_token_ids=self.eos_token_ids,
      pad_token_id=self.pad_token_id,
      rows=c.batch_size * num_samples if batches > 1 else 0,
    )

  @staticmethod
  def loop_trips(config: SamplingConfig, prompt_len: int) -> tuple[int, ...]:
    """Trips of the sampling program's loops whose trip count is traced, outermost first, for
    ``prompt_len``-token prompts when every response runs ``max_new_tokens`` (`ssapo-plan`
    scales those loops by them): with refill, ``refill_batches`` rounds of the decode loop;
    the decode steps; then the key blocks a step reads, on average over the steps
    (`ssapo_jax.models.attention.cached_attention`; none when the cache is one block)."""
    n, slots = config.max_new_tokens, prompt_len + config.max_new_tokens
    block = min(attention.DECODE_KEY_BLOCK, slots)
    blocks = np.minimum((prompt_len + np.arange(n)) // block + 1, -(-slots // block))
    trips = (n,) if block == slots else (n, max(1, round(float(blocks.mean()))))
    return ((config.refill_batches,) if config.refill_batches > 1 else ()) + trips

  def calls(self, plan: Sequence[PromptBatch]) -> list[list[PromptBatch]]:
    """The plan's batches as `_generate` calls: runs of up to ``config.refill_batches``
    consecutive batches of one padded length (each run one refill queue)."""
    calls: list[list[PromptBatch]] = []
    for batch in plan:
      last = calls[-1] if calls else None
      if last and last[0].length == batch.length and len(last) < self.config.refill_batches:
        last.append(batch)
      else:
        calls.append([batch])
    return calls

  def lower(self, model: CausalLM, prompt_len: int) -> jax.stages.Lowered:
    """The decoding program `sample` runs on ``prompt_len``-token prompts, lowered (``model``
    may be abstract): what `ssapo-plan` compiles. One batch, or with refill
    (``refill_batches`` > 1) a queue of that many batches."""
    graphdef, params, rest = self.decode_layout(model, abstract=True)
    b = self.config.batch_size * self.config.refill_batches
    rows = lambda ndim: NamedSharding(self.mesh, shd.batch_spec(ndim, b, self.mesh))  # noqa: E731
    prompts = jax.ShapeDtypeStruct((b, prompt_len), jnp.int32, sharding=rows(2))
    index = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows(1))
    key = jax.ShapeDtypeStruct(
      (), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=shd.replicated(self.mesh)
    )
    return _generate.lower(
      graphdef,
      params,
      rest,
      prompts,
      prompts,
      index,
      key,
      settings=self.settings(model, batches=self.config.refill_batches),
      mesh=self.mesh,
    )

  def sample(
    self,
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    *,
    temperature: float | None = None,
    num_samples: int | None = None,
    desc: str = "sample",
  ) -> Samples:
    """Samples every prompt; returns this process's rows.

    Args:
      model: the policy (parameters on ``mesh`` in any layout).
      prompts: all prompts as token id lists (every process passes the same list).
      key: PRNG key.
      temperature, num_samples: override the config's (evaluation samples greedily once).
      desc: progress-bar label.
    """
    c = self.config
    num_samples = c.num_samples if num_samples is None else num_samples
    start_time = time.perf_counter()
    lengths = [len(p) for p in prompts]
    plan = plan_batches(
      lengths, batch_size=c.batch_size, bucket_size=self.bucket_size, bucketed=self.bucketed
    )
    graphdef, params, rest = self.decode_layout(model)
    key = shd.put_global(key, shd.replicated(self.mesh))
    index, tokens, mask, logps = [], [], [], []
    # [prompt tokens, new tokens, prompt slots, decode slots] of this process's real rows.
    counts = np.zeros(4, np.int64)
    for call in tqdm(self.calls(plan), desc=desc, leave=False):
      settings = self.settings(
        model, temperature=temperature, num_samples=num_samples, batches=len(call)
      )
      size = c.batch_size * len(call)
      indices = np.concatenate([b.indices for b in call])
      is_real = np.concatenate([np.arange(c.batch_size) < b.num_real for b in call])
      rows = shd.host_batch_rows(self.mesh, size)
      local, real = indices[rows], is_real[rows]
      ids, pmask = left_pad(
        [prompts[i] for i in local], pad_id=self.pad_token_id, length=call[0].length
      )

      def to_global(x, size=size):
        spec = shd.batch_spec(x.ndim, size, self.mesh)
        return jax.make_array_from_process_local_data(
          NamedSharding(self.mesh, spec), x, (size,) + x.shape[1:]
        )

      gen, steps = _generate(
        graphdef,
        params,
        rest,
        to_global(ids),
        to_global(pmask),
        to_global(local.astype(np.int32)),
        key,
        settings=settings,
        mesh=self.mesh,
      )
      steps = int(steps.addressable_data(0))
      out = [shd.host_local_rows(x).reshape(local.size, num_samples, -1) for x in gen]
      index.append(local[real])
      for acc, x in zip((tokens, mask, logps), out):
        acc.append(x[real])
      # Slots cover every computed row (filler too); the slots of one row are counted once.
      # A refill queue's steps run its rows in flight: counted once, on process 0.
      if settings.rows:
        decode = settings.rows * steps if jax.process_index() == 0 else 0
      else:
        decode = local.size * num_samples * steps
      counts += [
        int(pmask[real].sum()) * num_samples,
        int(out[1][real].sum()),
        local.size * num_samples * call[0].length,
        decode,
      ]
    counts = _sum_over_processes(counts)
    index = np.concatenate(index) if index else np.zeros((0,), np.int64)
    order = np.argsort(index, kind="stable")
    stack = lambda parts, dtype: (
      np.concatenate(parts)[order].reshape(-1, c.max_new_tokens)
      if parts
      else np.zeros((0, c.max_new_tokens), dtype)
    )
    stats = RolloutStats(
      prompts=len(prompts),
      rows=len(plan) * c.batch_size * num_samples,
      prompt_tokens=int(counts[0]),
      new_tokens=int(counts[1]),
      prompt_slots=int(counts[2]),
      decode_slots=int(counts[3]),
      seconds=time.perf_counter() - start_time,
      devices=self.mesh.devices.size,
    )
    return Samples(
      index[order], stack(tokens, np.int32), stack(mask, np.int32), stack(logps, np.float32), stats
    )


def gather_samples(samples: Samples, num_prompts: int) -> Generation:
  """Every process's `Samples` in prompt order, on every process (numpy `Generation`).

  Deterministic: rows are placed by their global prompt index.
  """
  if jax.process_count() == 1:
    gathered = [samples]
  else:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    m = samples.prompt_index.size
    most = int(np.max(multihost_utils.process_allgather(np.array([m]))))
    s = samples.tokens.shape[0] // max(m, 1) if m else 0
    s = int(np.max(multihost_utils.process_allgather(np.array([s]))))
    pad_rows = lambda x: np.pad(x, [(0, (most - m) * s)] + [(0, 0)] * (x.ndim - 1))
    parts = multihost_utils.process_allgather(
      (
        np.pad(samples.prompt_index, (0, most - m), constant_values=-1),
        pad_rows(samples.tokens),
        pad_rows(samples.mask),
        pad_rows(samples.logps),
      )
    )
    gathered = [
      Samples(*(np.asarray(x[p]) for x in parts), samples.stats) for p in range(jax.process_count())
    ]
  index = np.concatenate([g.prompt_index for g in gathered])
  keep = index >= 0
  if sorted(index[keep].tolist()) != list(range(num_prompts)):
    raise ValueError(
      f"gather_samples: the processes sampled prompts {sorted(index[keep])[:8]}"
      f"..., expected each of 0..{num_prompts - 1} once"
    )
  order = np.argsort(np.where(keep, index, num_prompts), kind="stable")[:num_prompts]
  fields = []
  for name in ("tokens", "mask", "logps"):
    x = np.concatenate([getattr(g, name) for g in gathered])
    x = x.reshape(index.size, -1, x.shape[-1])[order]
    fields.append(x.reshape(-1, x.shape[-1]))
  return Generation(*fields)


def decode(
  tokenizer,
  tokens,
  mask,
  *,
  eos_token_ids: Sequence[int] | None = None,
  skip_special_tokens: bool = True,
) -> list[str]:
  """Response texts: each row's tokens where ``mask`` is 1, cut before the first EOS.

  ``eos_token_ids`` default to ``tokenizer.eos_token_id``.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  if eos_token_ids is None:
    eos = tokenizer.eos_token_id
    eos_token_ids = () if eos is None else (eos if isinstance(eos, (list, tuple)) else (eos,))
  eos_set = set(int(e) for e in eos_token_ids)
  texts = []
  for row, row_mask in zip(tokens, mask):
    ids = []
    for t, m in zip(row.tolist(), row_mask.tolist()):
      if not m or t in eos_set:
        break
      ids.append(t)
    texts.append(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))
  return texts
