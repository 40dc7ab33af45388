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
  # config key -> records left out because their prompt is in the seed or eval set
  left_out: dict[str, int] = dataclasses.field(default_factory=dict)


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
    raise CheckpointError(
      f"model.path={path!r} is not a directory: download the model first "
      f"(huggingface-cli download <org>/<model> --local-dir {path}) or set "
      "model.path=/path/to/model"
    )
  check_hf_dir(path)
  tokenizer_path = config.model.resolved_tokenizer_path
  try:
    tokenizer = load_tokenizer(tokenizer_path)
  except Exception as e:  # transformers raises OSError/ValueError/... for incomplete folders
    key = "model.tokenizer_path" if config.model.tokenizer_path else "model.path"
    raise CheckpointError(
      f"{key}={tokenizer_path!r}: no usable tokenizer "
      f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    ) from None
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


@dataclasses.dataclass
class Sources:
  """A run's validated records, loaded once (by the pre-run checks, reused by the run).

  Attributes:
    pairs: ``data.source``'s preference records, without those whose prompt is held out.
    prompts: ``data.prompt_source``'s prompt records, or None (the pools come from ``pairs``).
    evals: the held-out prompts of ``data.eval_source`` (at most ``rounds.num_eval_prompts``),
      or None (they come from the rows the split leaves over).
    reports: config key -> `ValidationReport` of each source.
    left_out: config key -> records left out because their prompt is held out.
  """

  pairs: list
  prompts: list | None
  evals: list | None
  reports: dict[str, Any]
  left_out: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataSplit:
  """The run's one seed/pool split (`split_data`)."""

  seed_pairs: list  # the labelled seed's PreferencePair records
  pools: list  # per round t >= 1, the PromptRecord list of pool t
  eval_prompts: list  # the held-out prompts evaluated each round
  manifest: Any  # `SplitManifest` of source rows (``split_manifest.json``)
  left_out: dict[str, int]  # config key -> records left out because their prompt is taken


def load_sources(config, *, verbose: bool = False) -> Sources:
  """Loads and validates every data source (no tokenisation); `DataError` names the key.

  The eval prompts are left out of the pairs, so each prompt is in one of seed, pools and
  held-out set.
  """
  from ssapo_jax.data import exclude_prompts, load_preferences, load_prompts

  d = config.data
  opts = dict(
    split=d.split,
    data_dir=d.data_dir,
    prompt_column=d.prompt_column,
    policy=d.policy,
    verbose=verbose,
  )
  pairs = _keyed(
    "data.source",
    d.source,
    lambda: load_preferences(
      d.source,
      format=d.format,
      chosen_column=d.chosen_column,
      rejected_column=d.rejected_column,
      **opts,
    ),
  )
  reports = {"data.source": pairs.report}
  left_out = {}
  evals = None
  if d.eval_source is not None:
    loaded = _keyed("data.eval_source", d.eval_source, lambda: load_prompts(d.eval_source, **opts))
    reports["data.eval_source"] = loaded.report
    evals = list(loaded)[: config.rounds.num_eval_prompts]
    pairs, left_out["data.source"] = exclude_prompts(pairs, evals)
  prompts = None
  if d.prompt_source is not None:
    prompts = _keyed(
      "data.prompt_source", d.prompt_source, lambda: load_prompts(d.prompt_source, **opts)
    )
    reports["data.prompt_source"] = prompts.report
  return Sources(list(pairs), None if prompts is None else list(prompts), evals, reports, left_out)


def split_data(config, sources: Sources, *, embeddings=None) -> DataSplit:
  """The run's seed/pool split of ``sources``: the one place it is made (`DataError` when the
  sizes do not fit the data).

  The labelled seed is ``data.seed_size`` pairs (``random``, or ``farthest_point`` on
  ``embeddings(pairs) -> [N, D]``; without ``embeddings`` a random seed of the same size); the
  round pools are the remaining prompts of ``data.source`` (or of ``data.prompt_source``, less
  the seed's and eval prompts), in the authors' shuffled order.
  """
  from ssapo_jax.data import PromptRecord, exclude_prompts, select_rows, split_rows

  d = config.data
  pairs, left_out = sources.pairs, dict(sources.left_out)
  method = d.seed_method if embeddings is not None else "random"
  split = dict(
    seed_size=d.seed_size,
    method=method,
    seed=d.split_seed,
    embeddings=None if method == "random" else embeddings(pairs),
  )
  try:
    if sources.prompts is None:
      prompts = [PromptRecord(prompt=p.prompt, row=p.row) for p in pairs]
      manifest = split_rows(
        [p.row for p in pairs], pool_sizes=d.pool_sizes, source=d.source, **split
      )
      seed_rows = manifest.seed_rows
    else:
      seed_rows = split_rows([p.row for p in pairs], source=d.source, **split).seed_rows
      prompts, left_out["data.prompt_source"] = exclude_prompts(
        sources.prompts, select_rows(pairs, seed_rows), sources.evals or []
      )
      manifest = split_rows(
        [p.row for p in prompts],
        seed_size=0,
        pool_sizes=d.pool_sizes,
        seed=d.split_seed,
        source=d.prompt_source,
      )
      manifest = dataclasses.replace(manifest, seed_rows=seed_rows)
  except ValueError as e:
    raise DataError(f"data.seed_size/data.pool_sizes do not fit the data: {e}") from None
  seed = select_rows(pairs, seed_rows)
  pools = [select_rows(prompts, rows) for rows in manifest.pool_rows]
  if not seed:
    raise DataError(f"data.seed_size={d.seed_size} selects no labelled pair from {d.source}")
  for t in range(config.rounds.num_rounds):
    if not pools[t]:
      raise DataError(f"data.pool_sizes[{t}] gives round {t + 1} no prompts")
  evals = (
    sources.evals
    if sources.evals is not None
    else select_rows(prompts, manifest.rest_rows)[: config.rounds.num_eval_prompts]
  )
  return DataSplit(seed, pools, evals, manifest, {k: v for k, v in left_out.items() if v})


def check_data(config, sources: Sources | None = None) -> DataSummary:
  """Sizes the seed/pool split of the sources (`load_sources`, `split_data`) for the plan.

  With ``farthest_point`` the sizes are those of a random seed (the same counts).
  """
  sources = load_sources(config) if sources is None else sources
  split = split_data(config, sources)
  return DataSummary(
    sources.reports,
    len(split.seed_pairs),
    [len(p) for p in split.pools][: config.rounds.num_rounds],
    len(split.eval_prompts),
    split.left_out,
  )


def check_lock(config, *, force_unlock: bool = False) -> str | None:
  """Whether the run may take the output directory's lock (`runlock.check_owner`'s rule).

  Returns what taking it over will say (a stale lock; another host's with ``force_unlock``),
  or None when there is no lock.

  Raises:
    RunLockedError: a live run on this host holds it, or another host does without
      ``force_unlock``.
  """
  from ssapo_jax.runlock import check_owner, read_owner

  return check_owner(config.output_dir, read_owner(config.output_dir), force=force_unlock)


def check_output_dir(config, *, allow_config_change: bool = False, force_unlock: bool = False):
  """Writable, not locked by a live run (see `check_lock`), and either new or holding this
  config (or allowed).

  Returns the `runrecord.ConfigVersion` the run will record.
  """
  from ssapo_jax import config as cfg_lib
  from ssapo_jax.rundir import is_remote
  from ssapo_jax.runrecord import check_config

  out = config.output_dir
  if out.startswith("gs://"):
    try:
      import gcsfs  # noqa: F401  (etils.epath's Google Cloud Storage backend)
    except ImportError:
      raise RunDirError(
        f"output_dir={out!r} needs the gcsfs package to write to Google Cloud "
        "Storage: pip install gcsfs"
      ) from None
  elif not is_remote(out):
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      where = (
        "is a file"
        if existing == os.path.abspath(out)
        else f"cannot be created: {existing} is a file"
      )
      raise RunDirError(f"output_dir={out!r} {where}, not a directory; choose a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
      raise RunDirError(
        f"output_dir={out!r} is not writable: no write permission on directory {existing}"
      )
  check_lock(config, force_unlock=force_unlock)
  return check_config(cfg_lib.to_dict(config), out, allow_change=allow_config_change)


def check_mesh(config):
  """The device mesh for the available devices, with the batch sizes that must divide it."""
  from ssapo_jax import sharding as shd

  try:
    mesh = shd.make_mesh(config.mesh)
    shd.check_batch_divisible(config.train.global_batch_size, mesh, what="train.global_batch_size")
  except ValueError as e:
    raise ConfigError(f"mesh: {e}") from None
  return mesh


@dataclasses.dataclass
class Preflight:
  """What the pre-run checks built, for the run to reuse instead of loading it again."""

  tokenizer: Any
  sources: Sources
  data: DataSummary
  version: Any  # the `runrecord.ConfigVersion` the run records
  mesh: Any = None  # `check_mesh`'s mesh, once the processes have started (`ssapo-train`)


def check_inputs(
  config, *, allow_config_change: bool = False, force_unlock: bool = False
) -> Preflight:
  """Everything a run reads, checked before it writes (`Preflight`)."""
  tokenizer = check_model(config)
  sources = load_sources(config)
  data = check_data(config, sources)
  version = check_output_dir(
    config, allow_config_change=allow_config_change, force_unlock=force_unlock
  )
  return Preflight(tokenizer, sources, data, version)


def plan_lines(config, data: DataSummary, mesh) -> list[str]:
  """What the run would do, one line per item (``ssapo-train --check``)."""
  lines = []
  for key, report in data.reports.items():
    skipped = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items())) or "none"
    lines.append(
      f"{key} {report.source}: {report.num_rows} rows, {report.num_kept} kept, "
      f"skipped {sum(report.skipped.values())} ({skipped})"
    )
    if data.left_out.get(key):
      lines.append(
        f"{key}: {data.left_out[key]} more left out: their prompt is in the "
        "labelled seed or the eval prompts"
      )
  m = dict(mesh.shape)
  lines.append(
    f"mesh: {mesh.devices.size} devices as data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}"
  )
  r, s = config.rounds, config.sampling
  g = config.train.global_batch_size
  tokens = 2 * g * config.data.max_length
  lines.append(
    f"rounds: seed round 0 + {r.num_rounds} self-annotation rounds; "
    f"global batch {g} pairs, at most {tokens} tokens per step "
    f"(2 x {g} x data.max_length={config.data.max_length})"
  )
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
      lines.append(
        f"round {t}: {prompts} prompts x {s.num_samples} samples, at most {pairs} "
        f"pairs, {epochs} epoch(s), at most {steps} steps"
      )
    total += steps
  ends = r.num_rounds + 1  # run.py: each round's end checkpoint takes a global step of its own
  lines.append(
    f"total: at most {total} optimizer steps, so at most global step {total + ends} "
    f"(the {ends} round-end checkpoints take one global step each); "
    f"{data.eval_prompts} eval prompts per round; output in {config.output_dir}"
  )
  return lines


def length_lines(config, checked: Preflight, mesh, path: str) -> list[str]:
  """``ssapo-train --check --length-histogram PATH``: the labelled seed tokenized as the run
  tokenizes it, its sequence lengths (prompt + response, both sides) as a `length_histogram`
  of ``data.bucket_size`` bins written to ``path``, and the expected padding fraction of the
  train batches, padded and packed (`batch.expected_padding`). Rounds >= 1 add prompts with
  sampled responses of at most ``sampling.max_new_tokens``; the seed stands in for them."""
  import json

  import numpy as np

  from ssapo_jax import train as tr
  from ssapo_jax.batch import expected_padding, length_histogram
  from ssapo_jax.data import tokenize_pairs

  d, t = config.data, config.train
  split = split_data(config, checked.sources)
  ds = tokenize_pairs(
    split.seed_pairs,
    checked.tokenizer,
    max_length=d.max_length,
    max_prompt_length=d.max_prompt_length,
    truncation_mode=d.truncation_mode,
    system_message=d.system_message,
    on_truncation=d.on_truncation,
    verbose=False,
  )
  prompt = np.asarray([len(x) for x in ds["prompt_ids"]])
  lengths = np.concatenate(
    [prompt + np.asarray([len(x) for x in ds[side]]) for side in ("chosen_ids", "rejected_ids")]
  )
  histogram = length_histogram(lengths, d.bucket_size)
  with open(path, "w") as f:
    json.dump({**histogram, "source": "labelled seed", "max_length": d.max_length}, f)
  pad = expected_padding(
    histogram,
    global_batch_size=t.global_batch_size,
    micro_batches=t.micro_batches,
    bucket_size=d.bucket_size,
    pack_length=d.resolved_pack_length,
    row_multiple=tr.packed_row_multiple(mesh, t),
  )
  q = np.percentile(lengths, [50, 90, 99])
  return [
    f"lengths: {lengths.size} seed sequences, median {q[0]:.0f}, p90 {q[1]:.0f}, p99 "
    f"{q[2]:.0f}, longest {lengths.max()} tokens (histogram in {path})",
    f"expected padding of the train batches: padded {pad['padded']:.1%} "
    f"({len(pad['padded_lengths'])} shapes drawn), packed {pad['packed']:.1%} "
    f"({len(pad['packed_rows'])} shapes drawn); data.packing={str(d.packing).lower()}",
  ]
