"""Batched sampling from a `ssapo_jax.models.Llama` with a KV cache, jitted end to end.

`generate` prefills left-padded prompts once, then runs a ``lax.while_loop`` over the cache that
samples one token per step (greedy, temperature, top-k, top-p) and exits early when every row
has emitted an end-of-sequence token. All randomness comes from the ``key`` argument: step
``t`` uses ``fold_in(key, t)``, so a key always gives the same samples.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.sharding import NamedSharding

from ssapo_jax import sharding as shd
from ssapo_jax.models.llama import Llama, positions_from_mask


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a round samples responses (the ``sampling`` section of an experiment config)."""

  temperature: float = 0.7     # softmax temperature; 0 = greedy
  top_p: float = 1.0           # nucleus mass kept (1 = off)
  top_k: int = 0               # keep the k most likely tokens (0 = off)
  max_new_tokens: int = 300    # response length limit, tokens
  num_samples: int = 2         # independent responses per prompt
  batch_size: int = 8          # prompts per `generate` call

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
    if self.top_k < 0:
      raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")
    for name in ("max_new_tokens", "num_samples", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"sampling.{name} must be >= 1, got {getattr(self, name)}")

  def generate_kwargs(self) -> dict:
    """Keyword arguments of `generate` that this config sets."""
    return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                max_new_tokens=self.max_new_tokens, num_samples=self.num_samples)


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


def _sample(logits, key, *, temperature, top_k, top_p):
  """Next tokens ``[B]`` int32 from ``logits [B, V]`` float32."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "temperature", "top_p", "top_k", "num_samples",
    "eos_token_ids", "pad_token_id"))
def _generate(graphdef, state, prompt_ids, prompt_mask, key, *, max_new_tokens, temperature,
              top_p, top_k, num_samples, eos_token_ids, pad_token_id):
  model: Llama = nnx.merge(graphdef, state)
  ids = jnp.repeat(prompt_ids.astype(jnp.int32), num_samples, axis=0)  # [B*S, P] prompt-major
  mask = jnp.repeat(prompt_mask.astype(jnp.int32), num_samples, axis=0)
  rows, prompt_len = ids.shape
  total = prompt_len + max_new_tokens
  cache = model.init_cache(rows, total)
  kv_mask = jnp.concatenate([mask, jnp.zeros((rows, max_new_tokens), jnp.int32)], axis=1)
  logits, cache = model.decode(ids, positions_from_mask(mask), cache, cache_index=0,
                               kv_mask=kv_mask)
  next_pos = jnp.sum(mask, axis=-1).astype(jnp.int32)  # [B*S]
  eos = jnp.asarray(eos_token_ids if eos_token_ids else (-1,), jnp.int32)

  init = dict(
      step=jnp.zeros((), jnp.int32),
      logits=logits[:, -1].astype(jnp.float32),
      cache=cache,
      kv_mask=kv_mask,
      pos=next_pos,
      done=jnp.zeros((rows,), bool),
      tokens=jnp.full((rows, max_new_tokens), pad_token_id, jnp.int32),
      mask=jnp.zeros((rows, max_new_tokens), jnp.int32),
      logps=jnp.zeros((rows, max_new_tokens), jnp.float32),
  )

  def cond(s):
    return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

  def body(s):
    step = s["step"]
    token = _sample(s["logits"], jax.random.fold_in(key, step), temperature=temperature,
                    top_k=top_k, top_p=top_p)
    live = ~s["done"]
    logp = jnp.take_along_axis(jax.nn.log_softmax(s["logits"], axis=-1), token[:, None],
                               axis=-1)[:, 0]
    token = jnp.where(live, token, pad_token_id)
    done = s["done"] | (live & jnp.isin(token, eos))
    slot = prompt_len + step
    kv_mask = jax.lax.dynamic_update_slice_in_dim(
        s["kv_mask"], jnp.ones((rows, 1), jnp.int32), slot, axis=1)
    logits, cache = model.decode(token[:, None], s["pos"][:, None], s["cache"],
                                 cache_index=slot, kv_mask=kv_mask)
    col = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v[:, None], step, axis=1)
    return dict(
        step=step + 1,
        logits=logits[:, -1].astype(jnp.float32),
        cache=cache,
        kv_mask=kv_mask,
        pos=s["pos"] + 1,
        done=done,
        tokens=col(s["tokens"], token),
        mask=col(s["mask"], live.astype(jnp.int32)),
        logps=col(s["logps"], jnp.where(live, logp, 0.0)),
    )

  out = jax.lax.while_loop(cond, body, init)
  return Generation(out["tokens"], out["mask"], out["logps"])


def prompt_sharding(state, batch_size: int) -> NamedSharding | None:
  """Rows over the batch axes of the mesh that the model's parameters live on (None when they
  are not on a mesh), so the prompts, KV cache and logits split like a train batch instead of
  being replicated on every device."""
  for leaf in jax.tree.leaves(state):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return NamedSharding(sharding.mesh, shd.batch_spec(2, batch_size, sharding.mesh))
  return None


def generate(model: Llama, prompt_ids, prompt_mask, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             num_samples: int = 1, eos_token_ids: Sequence[int] | int | None = None,
             pad_token_id: int | None = None) -> Generation:
  """Samples ``num_samples`` continuations of each left-padded prompt.

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

  Returns:
    `Generation` with ``[B*S, N]`` arrays, prompt-major rows.
  """
  cfg = model.config
  if eos_token_ids is None:
    eos_token_ids = cfg.eos_token_ids
  elif isinstance(eos_token_ids, (int, np.integer)):
    eos_token_ids = (int(eos_token_ids),)
  eos_token_ids = tuple(int(e) for e in eos_token_ids)
  if pad_token_id is None:
    pad_token_id = (cfg.pad_token_id if cfg.pad_token_id is not None
                    else eos_token_ids[0] if eos_token_ids else 0)
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1 or num_samples < 1:
    raise ValueError(f"generate: invalid sampling arguments temperature={temperature}, "
                     f"top_p={top_p}, top_k={top_k}, max_new_tokens={max_new_tokens}, "
                     f"num_samples={num_samples}")
  if prompt_ids.ndim != 2 or prompt_mask.shape != prompt_ids.shape:
    raise ValueError(f"generate: prompt_ids {prompt_ids.shape} and prompt_mask "
                     f"{prompt_mask.shape} must both be [B, P]")
  if not isinstance(prompt_mask, jax.core.Tracer):
    m = np.asarray(prompt_mask)
    if (np.diff(m, axis=1) < 0).any():
      raise ValueError("generate: prompts must be left-padded (found a 0 after a 1 in "
                       "prompt_mask)")
    if (m.sum(axis=1) == 0).any():
      raise ValueError("generate: every prompt needs at least one real token")
  graphdef, state = nnx.split(model)
  sharding = prompt_sharding(state, prompt_ids.shape[0])
  if sharding is not None and not isinstance(prompt_ids, jax.core.Tracer):
    prompt_ids = jax.device_put(np.asarray(prompt_ids), sharding)
    prompt_mask = jax.device_put(np.asarray(prompt_mask), sharding)
  return _generate(graphdef, state, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), key,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_p=float(top_p), top_k=int(top_k), num_samples=int(num_samples),
                   eos_token_ids=eos_token_ids, pad_token_id=int(pad_token_id))


def decode(tokenizer, tokens, mask, *, eos_token_ids: Sequence[int] | None = None,
           skip_special_tokens: bool = True) -> list[str]:
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
