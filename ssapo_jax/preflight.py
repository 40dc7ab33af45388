"""Checks a run's inputs before anything is written, and says what the run would do.

`ssapo-train` calls `check_inputs` before it takes the output directory's lock and records the
config, so a missing file, a bad row, an incomplete model directory, a locked or unwritable
output directory or a refused config change stops the run with nothing written.
``ssapo-train --check`` also builds the mesh and prints `plan_lines`: the rounds, pairs and
prompts per round, optimizer steps per round and tokens per step. Every failure raises the
`ssapo_jax.errors` class of its exit status.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from ssapo_jax.errors import CheckpointError, ConfigError, DataError, RunDirError


@dataclasses.dataclass
class DataSummary:
  """Row counts of a run's sources and of its seed/pool split (``split_rows`` with ``random``)."""

  reports: dict[str, Any]  # config key -> ValidationReport of that source
  seed_pairs: int
  pool_prompts: list[int]  # per round t >= 1
  eval_prompts: int


def check_model(config) -> Any:
  """The model directory (config.json, every safetensors header) and tokenizer; returns it."""
  from ssapo_jax.models.params import check_hf_dir
  from ssapo_jax.models.tokenizer import load_tokenizer
  from ssapo_jax.storage import local_copy
  try:
    path = local_copy(config.model.path)  # a gs:// folder: this host's copy
  except (FileNotFoundError, OSError) as e:
    raise CheckpointError(f"model.path={config.model.path!r} is not readable ({e})") from None
  if not os.path.isdir(path):
    raise CheckpointError(f"model.path={path!r} is not a directory: download the model first "
                          f"(huggingface-cli download <org>/<model> --local-dir {path}) or set "
                          "model.path=/path/to/model")
  check_hf_dir(path)
  tokenizer_path = config.model.resolved_tokenizer_path
  try:
    tokenizer = load_tokenizer(tokenizer_path)
  except Exception as e:  # transformers raises OSError/ValueError/... for incomplete folders
    key = "model.tokenizer_path" if config.model.tokenizer_path else "model.path"
    raise CheckpointError(f"{key}={tokenizer_path!r}: no usable tokenizer "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
  if tokenizer.pad_token_id is None:
    raise CheckpointError(f"tokenizer in {tokenizer_path!r} has neither a pad nor an EOS token")
  return tokenizer


def _keyed(key: str, source: str, load):
  """Runs ``load()``; a data error gets the config key that named the source."""
  try:
    return load()
  except DataError as e:
    raise DataError(f"{key}: {e}") from None
  except ValueError as e:  # e.g. "no valid rows remain", an unsupported extension
    raise DataError(f"{key}={source!r}: {e}") from None


def check_data(config) -> DataSummary:
  """Loads and validates every data source (no tokenisation) and sizes the seed/pool split."""
  from ssapo_jax.data import load_preferences, load_prompts, split_rows
  d = config.data
  opts = dict(split=d.split, data_dir=d.data_dir, prompt_column=d.prompt_column, policy=d.policy,
              verbose=False)
  pairs = _keyed("data.source", d.source, lambda: load_preferences(
      d.source, format=d.format, chosen_column=d.chosen_column,
      rejected_column=d.rejected_column, **opts))
  reports = {"data.source": pairs.report}
  prompts = None
  if d.prompt_source is not None:
    prompts = _keyed("data.prompt_source", d.prompt_source,
                     lambda: load_prompts(d.prompt_source, **opts))
    reports["data.prompt_source"] = prompts.report
  evals = None
  if d.eval_source is not None:
    evals = _keyed("data.eval_source", d.eval_source, lambda: load_prompts(d.eval_source, **opts))
    reports["data.eval_source"] = evals.report
  try:
    if prompts is None:
      manifest = split_rows(len(pairs), seed_size=d.seed_size, pool_sizes=d.pool_sizes,
                            seed=d.split_seed)
      seed = len(manifest.seed_rows)
    else:
      manifest = split_rows(len(prompts), seed_size=0, pool_sizes=d.pool_sizes, seed=d.split_seed)
      seed = len(split_rows(len(pairs), seed_size=d.seed_size, seed=d.split_seed).seed_rows)
  except ValueError as e:
    raise DataError(f"data.seed_size/data.pool_sizes do not fit the data: {e}") from None
  pools = [len(rows) for rows in manifest.pool_rows][:config.rounds.num_rounds]
  if seed == 0:
    raise DataError(f"data.seed_size={d.seed_size} selects no labelled pair from {d.source}")
  for t, n in enumerate(pools):
    if n == 0:
      raise DataError(f"data.pool_sizes[{t}] gives round {t + 1} no prompts")
  available = len(evals) if evals is not None else len(manifest.rest_rows)
  return DataSummary(reports, seed, pools, min(available, config.rounds.num_eval_prompts))


def check_output_dir(config, *, allow_config_change: bool = False):
  """Writable, not locked by a live run, and either new or holding this config (or allowed).

  Returns the `runrecord.ConfigVersion` the run will record.
  """
  from ssapo_jax import config as cfg_lib
  from ssapo_jax.pipeline.rundir import is_remote
  from ssapo_jax.runlock import RunLockedError, locked_message, read_owner
  from ssapo_jax.runrecord import check_config
  out = config.output_dir
  if out.startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  (etils.epath's Google Cloud Storage backend)
    except ImportError:
      raise RunDirError(f"output_dir={out!r} needs the gcsfs package to write to Google Cloud "
                        "Storage: pip install gcsfs") from None
  elif not is_remote(out):
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
      raise RunDirError(f"output_dir={out!r} is not writable ({existing} is not a writable "
                        "directory)")
  owner = read_owner(out)
  if owner is not None and owner.pid != os.getpid() and owner.is_alive():
    raise RunLockedError(locked_message(out, owner))
  return check_config(cfg_lib.to_dict(config), out, allow_change=allow_config_change)


def check_mesh(config):
  """The device mesh for the available devices, with the batch sizes that must divide it."""
  from ssapo_jax import sharding as shd
  try:
    mesh = shd.make_mesh(config.mesh)
    shd.check_batch_divisible(config.train.global_batch_size, mesh,
                              what="train.global_batch_size")
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  return mesh


def check_inputs(config, *, allow_config_change: bool = False):
  """Everything a run reads, checked before it writes: ``(tokenizer, DataSummary, ConfigVersion)``."""
  tokenizer = check_model(config)
  data = check_data(config)
  version = check_output_dir(config, allow_config_change=allow_config_change)
  return tokenizer, data, version


def plan_lines(config, data: DataSummary, mesh) -> list[str]:
  """What the run would do, one line per item (``ssapo-train --check``)."""
  lines = []
  for key, report in data.reports.items():
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "none"
    lines.append(f"{key} {report.source}: {report.num_rows} rows, {report.num_kept} kept, "
                 f"skipped {sum(report.skipped.values())} ({skipped})")
  m = dict(mesh.shape)
  lines.append(f"mesh: {mesh.devices.size} devices as data={m['data']} fsdp={m['fsdp']} "
               f"tensor={m['tensor']}")
  r, s = config.rounds, config.sampling
  g = config.train.global_batch_size
  tokens = 2 * g * config.data.max_length
  lines.append(f"rounds: seed round 0 + {r.num_rounds} self-annotation rounds; "
               f"global batch {g} pairs, at most {tokens} tokens per step "
               f"(2 x {g} x data.max_length={config.data.max_length})")
  total = 0
  pairs_so_far = data.seed_pairs
  for t in range(r.num_rounds + 1):
    epochs = config.train_for_round(t).epochs
    if t == 0:
      steps = epochs * math.ceil(data.seed_pairs / g)
      lines.append(f"round 0: {data.seed_pairs} labelled pairs, {epochs} epoch(s), {steps} steps")
    else:
      prompts = data.pool_prompts[t - 1]
      pairs = prompts + (pairs_so_far if r.accumulate else 0)
      pairs_so_far += prompts
      steps = epochs * math.ceil(pairs / g)
      lines.append(f"round {t}: {prompts} prompts x {s.num_samples} samples, at most {pairs} "
                   f"pairs, {epochs} epoch(s), at most {steps} steps")
    total += steps
  lines.append(f"total: at most {total} optimizer steps; {data.eval_prompts} eval prompts per "
               f"round; output in {config.output_dir}")
  return lines
