"""``ssapo-train``: run an SSAPO experiment from a YAML config plus ``key=value`` overrides.

    ssapo-train configs/zephyr_7b_ultrafeedback.yaml model.path=/models/zephyr-7b-sft-full \\
        output_dir=runs/zephyr dro.epsilon=0.05

Steps: load and validate the config; check every input before writing anything (the model
directory and tokenizer, each data source, the output directory: writable, not locked, and
holding either no config or this one); initialise ``jax.distributed`` when several processes
take part and build the mesh; ``--check`` stops here and prints what the run would do. Otherwise
take the output directory's lock (process 0), record the config (``config.yaml``, or a new
``config.<n>.yaml`` with ``--allow-config-change``), and run, resuming by default when the run's
checkpoint directory has a checkpoint (``ssapo_jax.pipeline.run.run``). A changed config on a
run that is already complete is not recorded: nothing would run with it.

``--force-unlock`` takes a lock that cannot be checked from this host (another host's), in the
pre-run checks and ``--check`` alike, saying whose it was; a stale lock on this host is taken
without it, and a live run on this host keeps its lock. Ctrl-C ends a run with one line,
``interrupted at <where>; rerun the same command to resume`` (also in ``run.log``), exit
status 130.

Every error a user can fix is one line, ``ssapo-train: error: …``, with the exit status of
`ssapo_jax.errors` (2 config, 3 data, 4 run directory, 5 model/checkpoint, 6 non-finite
training); ``--debug`` adds the traceback. Errors that end a started run go to ``run.log`` too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Sequence

from ssapo_jax.errors import ConfigError, SsapoError

PROG = "ssapo-train"


class UsageError(ConfigError):
  """A command-line flag that contradicts the run directory (exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog=PROG,
    description="Stackelberg Self-Annotated Preference Optimization (SSAPO) training run.",
    epilog="Overrides use dotted keys of the config, e.g. dro.epsilon=0.05 "
    "train.learning_rate=3e-7 rounds.num_rounds=2. See docs/running.md.",
  )
  parser.add_argument("config_path", help="YAML experiment config (see configs/)")
  parser.add_argument(
    "overrides",
    nargs="*",
    metavar="key=value",
    help="dotted config overrides; values are YAML (numbers, true/false, null, [lists])",
  )
  parser.add_argument("--output-dir", help="run directory (same as output_dir=...); local or gs://")
  parser.add_argument(
    "--resume",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="continue from the newest checkpoint in <output_dir>/checkpoints "
    "(default: resume when one exists; --no-resume starts afresh)",
  )
  parser.add_argument(
    "--coordinator-address",
    help="host:port of process 0 for multi-host runs (mesh.coordinator_address)",
  )
  parser.add_argument("--num-processes", type=int, help="number of processes (mesh.num_processes)")
  parser.add_argument("--process-id", type=int, help="index of this process (mesh.process_id)")
  parser.add_argument(
    "--print-config",
    action="store_true",
    help="print the resolved config as YAML and exit without running",
  )
  parser.add_argument(
    "--check",
    action="store_true",
    help="validate the config, data sources, model directory, tokenizer, "
    "output directory and mesh, print what the run would do, and exit "
    "(same exit statuses as a run)",
  )
  parser.add_argument(
    "--length-histogram",
    metavar="PATH",
    help="with --check: tokenize the labelled seed, print its sequence lengths and the "
    "expected padding of padded and packed batches (data.packing), and write the length "
    "histogram to PATH (JSON, what ssapo-plan --lengths reads)",
  )
  parser.add_argument(
    "--allow-config-change",
    action="store_true",
    help="resume a run whose recorded config differs; the new config is kept "
    "as config.<n>.yaml beside the old ones",
  )
  parser.add_argument(
    "--force-unlock",
    action="store_true",
    help="take the output directory's lock even if another run holds it (only "
    "after making sure that run is gone, e.g. its host was lost)",
  )
  parser.add_argument(
    "--debug", action="store_true", help="print the traceback of errors (normally one line)"
  )
  parser.add_argument(
    "--verbose",
    action="store_true",
    help="also show the progress bars of the libraries underneath (datasets)",
  )
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


def decide_resume(requested: bool | None, output_dir: str) -> bool:
  """``--resume``/``--no-resume``, or by default whether the run already has a checkpoint."""
  from ssapo_jax.checkpoint import checkpoint_dir, has_checkpoint

  exists = has_checkpoint(checkpoint_dir(output_dir))
  if requested is None:
    return exists
  if requested and not exists:
    raise UsageError(
      f"--resume: no checkpoint in {checkpoint_dir(output_dir)}; drop --resume to start a new run"
    )
  return requested


def one_line(error: BaseException) -> str:
  """The error's message on one line (whitespace runs collapsed)."""
  return " ".join(str(error).split())


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
RESUME_HINT = "rerun the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``ssapo-train`` and ``launch/train.py``; returns the exit status."""
  # Intermixed: overrides may come before or after flags (`cfg.yaml --resume a.b=1`).
  args = build_parser().parse_intermixed_args(argv)
  try:
    return _run(args)
  except SsapoError as e:
    if args.debug:
      traceback.print_exc()
    print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:  # Ctrl-C before the run started (the run itself handles its own)
    print(f"{PROG}: interrupted before the run started; {RESUME_HINT}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _quiet_libraries(verbose: bool) -> None:
  """Hides the progress bars of the libraries underneath (datasets) outside ``--verbose``."""
  if verbose:
    return
  from datasets.utils import logging as ds_logging

  ds_logging.disable_progress_bar()


def _run(args: argparse.Namespace) -> int:
  # Loading the config imports JAX and the model code, which takes seconds: say so first.
  if args.length_histogram and not args.check:
    raise UsageError("--length-histogram goes with --check")
  what = "printing the config" if args.print_config else "checking the config and inputs"
  print(f"{PROG}: {what} ({args.config_path})", file=sys.stderr, flush=True)
  from ssapo_jax import config as cfg_lib
  from ssapo_jax.experiment import load_experiment

  config = load_experiment(args.config_path, [*args.overrides, *_flag_overrides(args)])
  if args.print_config:
    sys.stdout.write(cfg_lib.dump_yaml(config))
    return 0
  _quiet_libraries(args.verbose)
  from ssapo_jax import preflight

  checked = preflight.check_inputs(
    config, allow_config_change=args.allow_config_change, force_unlock=args.force_unlock
  )
  data, version = checked.data, checked.version

  from ssapo_jax.sharding import initialize_distributed

  initialize_distributed(config.mesh)  # before any other JAX call touches the devices
  import jax

  mesh = checked.mesh = preflight.check_mesh(config)
  resume = decide_resume(args.resume, config.output_dir)
  if args.check:
    for line in preflight.plan_lines(config, data, mesh):
      print(line)
    if args.length_histogram:
      for line in preflight.length_lines(config, checked, mesh, args.length_histogram):
        print(line)
    takeover = preflight.check_lock(config, force_unlock=args.force_unlock)
    if takeover is not None:  # --check writes nothing: the run itself takes the lock
      print(f"run.lock: the run would start by {takeover}")
    print(f"{PROG} --check: OK ({'would resume' if resume else 'would start a new run'})")
    return 0
  if version.changes and resume and _run_complete(config):
    # Recording the new config would claim it trained something: record nothing.
    print(
      f"{PROG}: run already complete, nothing ran; the config change "
      f"({'; '.join(version.changes)}) was not recorded (use another output_dir to train "
      "with it)",
      file=sys.stderr,
    )
    return 0

  # Imported late: config errors must not depend on the training stack.
  from ssapo_jax import rundir, runrecord
  from ssapo_jax.pipeline import run as pipeline
  from ssapo_jax.runlock import run_lock

  process0 = jax.process_index() == 0
  # run.log first, so that taking over a stale lock is logged too.
  with (
    runrecord.run_log(rundir.local_workdir(config.output_dir), enabled=process0),
    run_lock(
      config.output_dir,
      process_index=jax.process_index(),
      force=args.force_unlock,
      log=runrecord.message,
    ),
  ):
    change = None
    if process0:
      runrecord.write_config(version, cfg_lib.dump_yaml(config))
    if version.changes:
      name = os.path.basename(version.path)
      runrecord.message(f"config changed ({'; '.join(version.changes)}); recorded as {name}")
      change = {
        "config_version": version.version,
        "config_file": name,
        "changed": "; ".join(version.changes),
      }
    try:
      pipeline.run(config, resume=resume, config_change=change, preflight=checked)
    except KeyboardInterrupt:
      where = runrecord.position()
      runrecord.message(f"interrupted at {where or 'start-up'}; {RESUME_HINT}")
      return EXIT_INTERRUPTED
    except SsapoError as e:  # printed by `main`; run.log gets it too
      runrecord.log_only(f"error: {one_line(e)}")
      raise
    except Exception as e:
      runrecord.log_only(
        f"error (a bug; the traceback is on stderr): {type(e).__name__}: {one_line(e)}"
      )
      raise
  return 0


def _run_complete(config) -> bool:
  """Whether every round of ``config`` is done (the run's newest checkpoint says so)."""
  from ssapo_jax.checkpoint import Checkpointer, checkpoint_dir, has_checkpoint

  directory = checkpoint_dir(config.output_dir)
  if not has_checkpoint(directory):
    return False
  from ssapo_jax.pipeline.run import resume_point

  with Checkpointer(directory, config=config.checkpoint) as ckpt:
    start = resume_point(ckpt)
  return start.round > config.rounds.num_rounds
