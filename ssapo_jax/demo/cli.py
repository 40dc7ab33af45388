"""`ssapo-demo`: a short real run of the library's pure functions on synthetic preferences.

Self-annotates 8 sampled responses per prompt with implicit rewards, selects best/worst pairs and
evaluates the DPO and robust DPO losses on them.
"""

import argparse

import jax
import jax.numpy as jnp

import ssapo_jax as sj


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--num-prompts", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  k_pol, k_ref, k_noise = jax.random.split(jax.random.key(args.seed), 3)
  ref_logps = -40.0 + 5.0 * jax.random.normal(k_ref, (args.num_prompts, 8))
  policy_logps = ref_logps + jax.random.normal(k_pol, (args.num_prompts, 8))
  rewards = sj.implicit_reward(policy_logps, ref_logps)
  pairs = sj.select_pairs(rewards)
  take = lambda x, idx: jnp.take_along_axis(x, idx[:, None], axis=1)[:, 0]
  pc, pr = take(policy_logps, pairs.chosen_idx), take(policy_logps, pairs.rejected_idx)
  rc, rr = take(ref_logps, pairs.chosen_idx), take(ref_logps, pairs.rejected_idx)
  print(f"usable pairs: {int(pairs.usable.sum())}/{args.num_prompts}, "
        f"mean margin {float(pairs.margin.mean()):.3f} nats")
  for loss_type in ("sigmoid", "hinge", "ipo", "robust"):
    ls = 0.1 if loss_type == "robust" else 0.0
    loss, metrics = sj.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=ls)
    print(f"{loss_type:>8}: loss {float(loss):.4f}  rewards/accuracies "
          f"{float(metrics['rewards/accuracies']):.3f}")


if __name__ == "__main__":
  main()
