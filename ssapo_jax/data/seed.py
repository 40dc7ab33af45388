"""Labelled seed selection, per-round prompt pools, and the split manifest.

The paper's split (authors' code): shuffle the N rows with seed 42, take the first 2,000 as
the labelled seed, then 8K / 20K / 30K prompts for rounds 1-3, the rest held out. The seed
can instead be chosen by farthest-point sampling (appendix G.2): embeddings are the
last-layer hidden state of the last prompt token under the SFT model, the distance is
cosine distance, and each step adds the point with the largest *sum* of distances to the
points chosen so far.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import typing
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

SeedMethod = Literal["random", "farthest_point"]
SEED_METHODS: tuple[str, ...] = typing.get_args(SeedMethod)


@functools.partial(jax.jit, static_argnames=("num",))
def _farthest_point(unit: jax.Array, first: jax.Array, num: int) -> jax.Array:
  n = unit.shape[0]

  def body(i, state):
    dist_sum, taken, picked = state
    last = picked[i - 1]
    cos = jnp.dot(unit, unit[last], precision=jax.lax.Precision.HIGHEST)  # [N]
    dist_sum = dist_sum + (1.0 - cos)
    taken = taken.at[last].set(True)
    nxt = jnp.argmax(jnp.where(taken, -jnp.inf, dist_sum)).astype(jnp.int32)
    return dist_sum, taken, picked.at[i].set(nxt)

  state = (
    jnp.zeros((n,), jnp.float32),
    jnp.zeros((n,), bool),
    jnp.zeros((num,), jnp.int32).at[0].set(first),
  )
  return jax.lax.fori_loop(1, num, body, state)[2]


def farthest_point_sampling(embeddings, num: int, *, first_index: int = 0) -> np.ndarray:
  """Greedy farthest-point selection with cosine distance and the sum criterion.

  Starting from ``first_index``, step ``t`` picks the unchosen point ``j`` maximising
  ``sum_{s in chosen} (1 - cos(x_j, x_s))`` (ties: lowest index). Runs as one jitted
  ``fori_loop`` with a running ``[N]`` distance sum (one ``[N, D] @ [D]`` product per step).

  Args:
    embeddings: ``[N, D]`` float array (no all-zero rows).
    num: number of points to choose, ``1 <= num <= N``.
    first_index: the first chosen point.

  Returns:
    ``[num]`` int64 indices into ``embeddings``, in selection order.
  """
  x = np.asarray(embeddings, np.float32)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be [N, D], got shape {x.shape}")
  n = x.shape[0]
  if not 1 <= num <= n:
    raise ValueError(f"num must be in [1, {n}], got {num}")
  if not 0 <= first_index < n:
    raise ValueError(f"first_index must be in [0, {n}), got {first_index}")
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  if np.any(norms == 0) or not np.all(np.isfinite(norms)):
    bad = int(np.flatnonzero((norms[:, 0] == 0) | ~np.isfinite(norms[:, 0]))[0])
    raise ValueError(f"embedding row {bad} is zero or not finite; cosine distance is undefined")
  picked = _farthest_point(jnp.asarray(x / norms), jnp.int32(first_index), num)
  return np.asarray(picked, np.int64)


def _count(size: int | float, total: int, what: str) -> int:
  if isinstance(size, (bool, np.bool_)):
    raise ValueError(f"{what} must be an int count or a float fraction, got {size!r}")
  if isinstance(size, (int, np.integer)):
    k = int(size)
  elif isinstance(size, float) and 0.0 < size <= 1.0:
    k = int(round(size * total))
  else:
    raise ValueError(f"{what} must be a count >= 0 or a fraction in (0, 1], got {size!r}")
  if not 0 <= k <= total:
    raise ValueError(f"{what} = {size!r} asks for {k} rows but only {total} are available")
  return k


@dataclasses.dataclass(frozen=True)
class SplitManifest:
  """Which source rows went where: the labelled seed, each round's pool, the held-out rest."""

  seed_rows: np.ndarray
  pool_rows: tuple[np.ndarray, ...]
  rest_rows: np.ndarray
  settings: dict

  def to_json(self) -> dict:
    return {
      "settings": self.settings,
      "counts": {
        "seed": len(self.seed_rows),
        "pools": [len(p) for p in self.pool_rows],
        "rest": len(self.rest_rows),
      },
      "seed_rows": self.seed_rows.tolist(),
      "pool_rows": [p.tolist() for p in self.pool_rows],
      "rest_rows": self.rest_rows.tolist(),
    }


def split_rows(
  rows: Sequence[int] | int,
  *,
  seed_size: int | float,
  pool_sizes: Sequence[int | float] = (),
  method: str = "random",
  seed: int = 42,
  embeddings=None,
  source: str = "",
) -> SplitManifest:
  """Chooses the labelled seed and splits the remaining rows into round pools.

  The rows are shuffled with ``seed``. ``random`` takes the first ``seed_size`` of the
  shuffled order (the authors' code); ``farthest_point`` runs `farthest_point_sampling` on
  ``embeddings`` from the first shuffled row. The remaining rows, in shuffled order, fill the
  pools one after another; what is left is ``rest_rows`` (held out).

  Args:
    rows: source row indices (e.g. ``[r.row for r in records]``), or a count N for ``0..N-1``.
    seed_size: seed count, or fraction of all rows.
    pool_sizes: per-round pool counts, or fractions of the rows left after the seed.
    method: ``"random"`` or ``"farthest_point"``.
    seed: shuffle seed.
    embeddings: ``[N, D]`` prompt embeddings aligned with ``rows`` (farthest_point only).
    source: recorded in the manifest settings.

  Returns:
    A `SplitManifest` of source row indices.
  """
  rows = np.arange(rows) if isinstance(rows, (int, np.integer)) else np.asarray(rows, np.int64)
  n = len(rows)
  if method not in SEED_METHODS:
    raise ValueError(f"method must be one of {SEED_METHODS}, got {method!r}")
  k = _count(seed_size, n, "seed_size")
  order = np.random.default_rng(seed).permutation(n)
  if method == "random":
    chosen = order[:k]
  else:
    if embeddings is None:
      raise ValueError("method='farthest_point' needs embeddings [N, D]")
    if len(embeddings) != n:
      raise ValueError(f"embeddings have {len(embeddings)} rows but there are {n} rows")
    chosen = farthest_point_sampling(embeddings, k, first_index=int(order[0])) if k else order[:0]
  left = order[~np.isin(order, chosen)]
  counts = [_count(s, len(left), f"pool_sizes[{i}]") for i, s in enumerate(pool_sizes)]
  if sum(counts) > len(left):
    raise ValueError(
      f"pool_sizes {list(pool_sizes)} ask for {sum(counts)} rows but only "
      f"{len(left)} remain after the seed"
    )
  ends = np.cumsum([0] + counts)
  pools = tuple(rows[left[a:b]] for a, b in zip(ends[:-1], ends[1:]))
  settings = {
    "source": source,
    "num_rows": n,
    "method": method,
    "seed_size": seed_size,
    "pool_sizes": list(pool_sizes),
    "seed": seed,
  }
  return SplitManifest(
    seed_rows=rows[chosen], pool_rows=pools, rest_rows=rows[left[ends[-1] :]], settings=settings
  )


def save_manifest(manifest: SplitManifest, path: str | os.PathLike) -> None:
  """Writes the manifest as JSON (settings, counts and the row lists)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(manifest.to_json(), f)


def load_manifest(path: str | os.PathLike) -> SplitManifest:
  with open(path) as f:
    d = json.load(f)
  return SplitManifest(
    seed_rows=np.asarray(d["seed_rows"], np.int64),
    pool_rows=tuple(np.asarray(p, np.int64) for p in d["pool_rows"]),
    rest_rows=np.asarray(d["rest_rows"], np.int64),
    settings=d["settings"],
  )


def prompt_key(prompt) -> tuple:
  """What makes two prompts the same: their messages' roles and stripped contents."""
  return tuple((m["role"], m["content"].strip()) for m in prompt)


def exclude_prompts(records: Sequence, *others: Sequence) -> tuple[list, int]:
  """``records`` without those whose prompt is in any of ``others`` (records with ``.prompt``),
  and how many were left out: the run keeps each prompt in one of seed, pools and held-out set
  when they come from different sources. Order is kept."""
  taken = {prompt_key(r.prompt) for other in others for r in other}
  kept = [r for r in records if prompt_key(r.prompt) not in taken]
  return kept, len(records) - len(kept)


def select_rows(records: Sequence, rows: Sequence[int]) -> list:
  """The records whose ``.row`` is in ``rows``, in the order of ``rows``."""
  by_row = {r.row: r for r in records}
  missing = [int(r) for r in rows if int(r) not in by_row]
  if missing:
    raise ValueError(f"{len(missing)} manifest rows are not in the records, e.g. {missing[:5]}")
  return [by_row[int(r)] for r in rows]


def last_token_embeddings(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Hidden state of each sequence's last real token.

  Args:
    hidden: ``[B, T, D]`` last-layer hidden states.
    mask: ``[B, T]`` 1 on real tokens (left or right padding).

  Returns:
    ``[B, D]``.
  """
  t = hidden.shape[1]
  last = t - 1 - jnp.argmax(jnp.flip(mask, axis=1) > 0, axis=1)  # [B]
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
