"""``ssapo-train``: run an SSAPO experiment from a YAML config plus ``key=value`` overrides.

    ssapo-train configs/zephyr_7b_ultrafeedback.yaml model.path=/models/zephyr-7b-sft-full \\
        output_dir=runs/zephyr dro.epsilon=0.05

Steps: load and validate the config (errors print one line and exit with status 2), check the
model directory, initialise ``jax.distributed`` when several processes take part, decide whether
to resume (by default: when the run's checkpoint directory has a checkpoint), write the resolved
config to ``<output_dir>/config.yaml`` and call ``ssapo_jax.pipeline.run.run(config, resume=...)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

EXIT_CONFIG_ERROR = 2
EXIT_DATA_ERROR = 3  # a bad data row (DataValidationError)
PROG = "ssapo-train"


class UsageError(Exception):
  """A problem the user can fix from the command line; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=PROG,
      description="Stackelberg Self-Annotated Preference Optimization (SSAPO) training run.",
      epilog="Overrides use dotted keys of the config, e.g. dro.epsilon=0.05 "
             "train.learning_rate=3e-7 rounds.num_rounds=2. See docs/running.md.")
  parser.add_argument("config_path", help="YAML experiment config (see configs/)")
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="dotted config overrides; values are YAML (numbers, true/false, null, [lists])")
  parser.add_argument("--output-dir", help="run directory (same as output_dir=...); local or gs://")
  parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                      help="continue from the newest checkpoint in <output_dir>/checkpoints "
                           "(default: resume when one exists; --no-resume starts afresh)")
  parser.add_argument("--coordinator-address",
                      help="host:port of process 0 for multi-host runs (mesh.coordinator_address)")
  parser.add_argument("--num-processes", type=int, help="number of processes (mesh.num_processes)")
  parser.add_argument("--process-id", type=int, help="index of this process (mesh.process_id)")
  parser.add_argument("--print-config", action="store_true",
                      help="print the resolved config as YAML and exit without running")
  return parser


def _flag_overrides(args: argparse.Namespace) -> list[str]:
  """Dedicated flags become ordinary overrides, so a flag plus the same key=value is an error."""
  flags = []
  if args.output_dir is not None:
    flags.append(f"output_dir={args.output_dir}")
  if args.coordinator_address is not None:
    flags.append(f"mesh.coordinator_address={args.coordinator_address}")
  if args.num_processes is not None:
    flags.append(f"mesh.num_processes={args.num_processes}")
  if args.process_id is not None:
    flags.append(f"mesh.process_id={args.process_id}")
  return flags


def check_model_dir(config) -> None:
  """Raises `UsageError` unless ``model.path`` (and the tokenizer directory) exist locally."""
  from ssapo_jax.pipeline.rundir import is_remote
  path = config.model.path
  if is_remote(path):
    raise UsageError(f"model.path={path!r}: the model must be a local directory (copy it to each "
                     "host first, e.g. with gsutil -m cp -r)")
  if not os.path.isdir(path):
    raise UsageError(
        f"model.path={path!r} is not a directory. Download the model first, e.g.\n"
        f"  huggingface-cli download <org>/<model> --local-dir {path}\n"
        "or point the run at an existing copy with model.path=/path/to/model")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise UsageError(f"model.path={path!r} has no config.json; expected a Hugging Face model "
                     "directory (config.json, *.safetensors, tokenizer files)")
  tokenizer = config.model.resolved_tokenizer_path
  if tokenizer != path and not os.path.isdir(tokenizer):
    raise UsageError(f"model.tokenizer_path={tokenizer!r} is not a directory")


def check_output_dir(config) -> None:
  """Raises `UsageError` when a ``gs://`` output directory cannot be written from this host."""
  if config.output_dir.startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  (etils.epath's Google Cloud Storage backend)
    except ImportError:
      raise UsageError(f"output_dir={config.output_dir!r} needs the gcsfs package to write to "
                       "Google Cloud Storage: pip install gcsfs") from None


def decide_resume(requested: bool | None, output_dir: str) -> bool:
  """``--resume``/``--no-resume``, or by default whether the run already has a checkpoint."""
  from ssapo_jax.checkpoint import checkpoint_dir, has_checkpoint
  exists = has_checkpoint(checkpoint_dir(output_dir))
  if requested is None:
    return exists
  if requested and not exists:
    raise UsageError(f"--resume: no checkpoint in {checkpoint_dir(output_dir)}; "
                     "drop --resume to start a new run")
  return requested


def _changed_keys(old, new, prefix: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    keys = list(dict.fromkeys([*old, *new]))
    return [k for key in keys
            for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
  return [] if old == new else [prefix.rstrip(".")]


def warn_if_config_changed(config, output_dir: str) -> list[str]:
  """On resume, lists (and prints) keys whose value differs from the run's saved config.yaml."""
  from etils import epath
  from ssapo_jax import config as cfg_lib
  path = epath.Path(output_dir) / cfg_lib.CONFIG_FILENAME
  if not path.exists():
    return []
  import yaml
  old = yaml.safe_load(path.read_text()) or {}
  changed = _changed_keys(old, cfg_lib.to_dict(config))
  if changed:
    print(f"{PROG}: warning: resuming with a config that differs from {path} in: "
          f"{', '.join(changed)}", file=sys.stderr)
  return changed


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``ssapo-train`` and ``launch/train.py``; returns the exit status."""
  # Intermixed: overrides may come before or after flags (`cfg.yaml --resume a.b=1`).
  args = build_parser().parse_intermixed_args(argv)
  from ssapo_jax import config as cfg_lib
  from ssapo_jax.experiment import load_experiment
  try:
    config = load_experiment(args.config_path, [*args.overrides, *_flag_overrides(args)])
    if args.print_config:
      sys.stdout.write(cfg_lib.dump_yaml(config))
      return 0
    check_model_dir(config)
    check_output_dir(config)
  except (cfg_lib.ConfigError, UsageError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return EXIT_CONFIG_ERROR

  from ssapo_jax.sharding import initialize_distributed
  initialize_distributed(config.mesh)  # before any other JAX call touches the devices
  import jax

  try:
    resume = decide_resume(args.resume, config.output_dir)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return EXIT_CONFIG_ERROR
  if jax.process_index() == 0:
    if resume:
      warn_if_config_changed(config, config.output_dir)
    cfg_lib.save_resolved(config, config.output_dir)

  # Imported late: config errors must not depend on the training stack.
  from ssapo_jax.data import DataValidationError
  from ssapo_jax.pipeline import run as pipeline
  try:
    pipeline.run(config, resume=resume)
  except DataValidationError as e:  # names the file, row and field; nothing written is lost
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return EXIT_DATA_ERROR
  return 0


if __name__ == "__main__":
  sys.exit(main())
