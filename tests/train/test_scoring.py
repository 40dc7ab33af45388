"""Tests of ssapo_jax/train/scoring.py: batched log-probs against full-logit references, the
fingerprint cache and the `Scorer` (fixed-size batches, tokenised pair datasets)."""

import math

import _multihost_worker as w
import jax
import jax.numpy as jnp
import numpy as np

from ssapo_jax import sharding as shd
from ssapo_jax import train as tr


def _mesh(shape):
  return shd.make_mesh(shd.MeshConfig(*shape), devices=jax.devices()[: math.prod(shape)])


def _ref_seq_logps(model, ids, mask, loss_mask):
  """Summed log-probs of the ``loss_mask`` tokens from the model's full logits."""
  logits = model(ids, mask).astype(jnp.float32)  # [B, T, V]
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(tok * loss_mask[:, 1:], axis=-1)


def test_compute_logps_matches_full_logits_and_caches(tmp_path):
  mesh = _mesh((2, 2, 2))
  model = w.tiny_model(seed=3)
  graphdef, params, rest = tr.split_model(model)
  params = shd.shard_params(params, tr.param_shardings(params, mesh))
  logps_fn = tr.make_compute_logps(mesh, graphdef, params, rest)
  batches = [w.make_batch(20), jax.tree.map(lambda x: x[:5], w.make_batch(21))]  # short last
  seqs = [(b.chosen_ids, b.chosen_mask, b.chosen_loss_mask) for b in batches]
  got = tr.compute_logps(logps_fn, params, mesh, seqs, batch_size=8)
  ids, mask, loss_mask = (np.concatenate([s[i] for s in seqs]) for i in range(3))
  expected = _ref_seq_logps(
    w.tiny_model(seed=3), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(loss_mask)
  )
  assert got.shape == (13,) and got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-4)

  chosen, rejected = tr.cached_pair_logps(
    logps_fn, params, mesh, batches, batch_size=8, cache_dir=tmp_path
  )
  np.testing.assert_allclose(chosen, got, rtol=1e-6)
  files = list(tmp_path.iterdir())
  assert len(files) == 1
  np.savez(files[0], chosen=chosen + 1.0, rejected=rejected)  # a cache hit reads the file
  again, _ = tr.cached_pair_logps(logps_fn, params, mesh, batches, batch_size=8, cache_dir=tmp_path)
  np.testing.assert_allclose(again, chosen + 1.0)
  other = jax.tree.map(lambda x: x * 1.01, params)  # different weights: a new cache key
  assert tr.params_fingerprint(other) != tr.params_fingerprint(params)
  tr.cached_pair_logps(logps_fn, other, mesh, batches, batch_size=8, cache_dir=tmp_path)
  assert len(list(tmp_path.iterdir())) == 2


def _one_at_a_time(model, prompt, response):
  ids = jnp.asarray([list(prompt) + list(response)])
  loss_mask = jnp.asarray([[0] * len(prompt) + [1] * len(response)])
  return float(_ref_seq_logps(model, ids, jnp.ones_like(ids), loss_mask)[0])


def test_scorer_sequences_match_one_at_a_time_reference():
  """Unequal lengths, a short last batch padded by repetition, lengths bucketed to 16."""
  mesh = _mesh((2, 2, 2))
  model = w.tiny_model(seed=5)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 64, rng.integers(2, 7)).tolist() for _ in range(11)]
  responses = [rng.integers(3, 64, rng.integers(1, 9)).tolist() for _ in range(11)]
  scorer = tr.Scorer(mesh, pad_id=0, batch_size=8, bucket_size=16)
  got = scorer.sequences(model, prompts, responses)
  expected = [_one_at_a_time(model, p, r) for p, r in zip(prompts, responses)]
  assert got.shape == (11,) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  assert len(scorer._fns) == 1  # one jitted pass per model graph
  scorer.sequences(w.tiny_model(seed=6), prompts, responses)
  assert len(scorer._fns) == 1


def test_scorer_pairs_in_dataset_order_and_cached(tmp_path):
  from ssapo_jax.data import pairs_from_token_ids

  mesh = _mesh((2, 2, 2))
  model = w.tiny_model(seed=7)
  rng = np.random.default_rng(1)
  prompts = [[1, *rng.integers(3, 64, rng.integers(2, 6)).tolist()] for _ in range(13)]
  chosen = [rng.integers(3, 64, rng.integers(1, 6)).tolist() for _ in range(13)]
  rejected = [rng.integers(3, 64, rng.integers(1, 6)).tolist() for _ in range(13)]
  dataset = pairs_from_token_ids(
    prompts, chosen, rejected, eos_id=2, max_length=32, max_prompt_length=16, verbose=False
  )
  scorer = tr.Scorer(mesh, pad_id=0, batch_size=8, bucket_size=16)
  got_c, got_r = scorer.pairs(model, dataset, cache_dir=str(tmp_path))
  for side, got in (("chosen", got_c), ("rejected", got_r)):
    expected = [
      _one_at_a_time(model, p, r) for p, r in zip(dataset["prompt_ids"], dataset[f"{side}_ids"])
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  (cache,) = list(tmp_path.iterdir())
  assert cache.name.startswith(f"ref_logps-{tr.params_fingerprint(tr.split_model(model)[1])}-")
