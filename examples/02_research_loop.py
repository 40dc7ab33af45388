"""A research loop with your own model: SSAPO's pure functions composed under one ``jax.jit``.

Each step, for a batch of prompts (fixed shapes, so the step compiles once):

1. the policy samples ``n`` responses per prompt (plain ancestral sampling);
2. policy and frozen reference score them with `ssapo_jax.sequence_logps`;
3. self-annotation: implicit rewards, best-vs-worst pairs (`select_pairs`);
4. the follower: `follower_atoms` on the pairs' margins, prompts without a usable pair masked;
5. the leader: `robust_dpo_loss` on the pairs under those atoms, one optax AdamW update.

The model is a user-defined Flax NNX module (a tiny embedding + MLP language model), split
once into ``graphdef`` and parameters so the step is a pure function of pytrees. ``main``
returns the losses and how many times the step was traced and compiled (1 for a fixed shape).

    python examples/02_research_loop.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ssapo_jax as sj


class TinyLM(nnx.Module):
  """A toy causal LM: ``logits[t]`` depends on tokens ``t`` and ``t − 1`` only."""

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.prev = nnx.Embed(vocab, dim, rngs=rngs)
    self.hidden = nnx.Linear(dim, dim, rngs=rngs)
    self.out = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``[B, T]`` int tokens -> ``[B, T, V]`` next-token logits."""
    shifted = jnp.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    h = jax.nn.gelu(self.hidden(self.embed(tokens) + self.prev(shifted)))
    return self.out(h)


def sequence_logps(model: TinyLM, tokens: jax.Array, prompt_len: int) -> jax.Array:
  """``[B]`` summed log-probs of each row's response (positions ``prompt_len..T−1``)."""
  logits = model(tokens)[:, :-1]  # logits[:, t] scores tokens[:, t + 1]
  labels = tokens[:, 1:]
  loss_mask = (jnp.arange(labels.shape[1]) >= prompt_len - 1)[None].repeat(tokens.shape[0], 0)
  return sj.sequence_logps(logits, labels, loss_mask.astype(jnp.int32))


def sample(
  model: TinyLM, prompts: jax.Array, num_samples: int, length: int, key: jax.Array
) -> jax.Array:
  """``[P * n, Tp + length]``: ``n`` sampled continuations per prompt (rows prompt-major)."""
  tokens = jnp.repeat(prompts, num_samples, axis=0)
  tokens = jnp.pad(tokens, ((0, 0), (0, length)))
  start = prompts.shape[1]

  def body(i, carry):
    tokens, key = carry
    key, sub = jax.random.split(key)
    logits = model(tokens)[:, start + i - 1]
    nxt = jax.random.categorical(sub, logits)
    return tokens.at[:, start + i].set(nxt), key

  tokens, _ = jax.lax.fori_loop(0, length, body, (tokens, key))
  return tokens


def make_step(
  graphdef,
  optimizer,
  dro_config: sj.DroConfig,
  *,
  beta: float,
  num_samples: int,
  response_len: int,
  traces: list,
):
  """The jitted research step ``(params, opt_state, ref_params, prompts, key) -> ...``."""

  @jax.jit
  def step(params, opt_state, ref_params, prompts, key):
    traces.append(1)  # runs only while tracing: counts compiles of this step
    k_sample, k_follower = jax.random.split(key)
    num_prompts, prompt_len = prompts.shape
    policy = nnx.merge(graphdef, params)
    reference = nnx.merge(graphdef, ref_params)
    tokens = sample(policy, prompts, num_samples, response_len, k_sample)
    # Self-annotation with the current policy against the frozen reference (no gradient).
    shape = (num_prompts, num_samples)
    pol = jax.lax.stop_gradient(sequence_logps(policy, tokens, prompt_len)).reshape(shape)
    ref = sequence_logps(reference, tokens, prompt_len).reshape(shape)
    pairs = sj.select_pairs(sj.implicit_reward(pol, ref))
    atoms = sj.follower_atoms(pairs.margin, dro_config, valid=pairs.usable, key=k_follower)
    rows = jnp.arange(num_prompts) * num_samples
    chosen, rejected = tokens[rows + pairs.chosen_idx], tokens[rows + pairs.rejected_idx]
    ref_c = ref.reshape(-1)[rows + pairs.chosen_idx]
    ref_r = ref.reshape(-1)[rows + pairs.rejected_idx]

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      pc = sequence_logps(model, chosen, prompt_len)
      pr = sequence_logps(model, rejected, prompt_len)
      return sj.robust_dpo_loss(
        pc, pr, ref_c, ref_r, atoms, beta=beta, space=dro_config.space, valid=pairs.usable
      )

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (
      params,
      opt_state,
      {"loss": loss, "usable": jnp.sum(pairs.usable), "accuracy": metrics["rewards/accuracies"]},
    )

  return step


def main(
  *,
  steps: int = 4,
  num_prompts: int = 16,
  num_samples: int = 4,
  prompt_len: int = 6,
  response_len: int = 6,
  vocab: int = 32,
  dim: int = 32,
  seed: int = 0,
) -> dict:
  """Runs ``steps`` research steps on random prompts; returns losses and the compile count."""
  beta = 0.1
  graphdef, params = nnx.split(TinyLM(vocab, dim, rngs=nnx.Rngs(seed)))
  ref_params = jax.tree.map(jnp.copy, params)  # the frozen reference: the initial policy
  optimizer = optax.adamw(1e-2)
  opt_state = optimizer.init(params)
  dro_config = sj.DroConfig(
    epsilon=0.01, margin_scale=beta, grouping="random", group_size=max(num_prompts // 2, 1)
  )
  traces = []
  step = make_step(
    graphdef,
    optimizer,
    dro_config,
    beta=beta,
    num_samples=num_samples,
    response_len=response_len,
    traces=traces,
  )
  key = jax.random.key(seed)
  losses = []
  for _ in range(steps):
    key, k_prompts, k_step = jax.random.split(key, 3)
    prompts = jax.random.randint(k_prompts, (num_prompts, prompt_len), 1, vocab)
    params, opt_state, metrics = step(params, opt_state, ref_params, prompts, k_step)
    losses.append(float(metrics["loss"]))
    print(
      f"loss {losses[-1]:.4f}  usable pairs {int(metrics['usable'])}/{num_prompts}  "
      f"reward accuracy {float(metrics['accuracy']):.2f}"
    )
  print(f"traced {len(traces)} time(s), compiled {step._cache_size()} program(s) for {steps} steps")
  return {"losses": losses, "traces": len(traces), "compiles": step._cache_size()}


if __name__ == "__main__":
  main(steps=20)
