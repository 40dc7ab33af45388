import jax
import jax.numpy as jnp

import ssapo_jax as sj

k_policy, k_ref = jax.random.split(jax.random.key(0))
# Self-annotation: summed log-probs of n = 4 sampled responses for each of P = 8 prompts under
# the policy and the reference ([P, n]; random here, `sj.sequence_logps` of your models in a
# real loop, see examples/02_research_loop.py).
policy_logps = -20 + 5 * jax.random.normal(k_policy, (8, 4))
ref_logps = -20 + 5 * jax.random.normal(k_ref, (8, 4))
rewards = sj.implicit_reward(policy_logps, ref_logps)  # [P, n]
pairs = sj.select_pairs(rewards)  # chosen/rejected idx, margin, usable

# The pairs' [P] log-probs: gather with the indices (fixed shapes, so this runs under jit);
# a prompt without a usable pair stays a row, masked with valid=pairs.usable.
take = lambda logps, idx: jnp.take_along_axis(logps, idx[:, None], axis=1)[:, 0]
pc, pr = take(policy_logps, pairs.chosen_idx), take(policy_logps, pairs.rejected_idx)
rc, rr = take(ref_logps, pairs.chosen_idx), take(ref_logps, pairs.rejected_idx)

# Any loss of sj.LOSS_TYPES, mean over the usable pairs.
loss, metrics = sj.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="sigmoid", valid=pairs.usable)

# The follower: the worst case in the ε-Wasserstein ball around ξ = σ(0.1·margin), exactly.
# Jittable for a fixed number of rows; rows with valid=False get no mass and no budget; pass
# key= for grouping="random" (the only setting that draws).
config = sj.DroConfig(epsilon=0.01, margin_scale=0.1)
follower = jax.jit(sj.follower_atoms, static_argnames="config")
atoms = follower(pairs.margin, config, valid=pairs.usable)  # LossAtoms [P, K]

# The leader's loss under the worst case; the atoms carry their space and margin scale, and a
# mismatch with space/beta raises (allow_scale_mismatch=True when it is deliberate).
robust, metrics = sj.robust_dpo_loss(
  pc, pr, rc, rr, atoms, beta=0.1, space="probability", valid=pairs.usable
)
print(f"dpo {float(loss):.4f}  robust {float(robust):.4f}  usable {int(pairs.usable.sum())}/8")
