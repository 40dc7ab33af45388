"""``ssapo-plan``: compile a config's programs for a TPU slice ahead of time, on a CPU machine.

For a Cloud TPU slice name (``v5p-32``, ``v4-32``, ``v5litepod-64``, ...) the plan builds the
slice's devices with ``jax.experimental.topologies`` (through libtpu, no TPU needed), a mesh of
them as the config asks, and abstract state (``jax.ShapeDtypeStruct`` with `NamedSharding`s,
no weights). It compiles the three programs a run executes:

* ``train_step``: the real jitted `ssapo_jax.train.train_step` (configured mesh, global batch,
  micro-batches, remat, dtypes, ``data.max_length``) on a donated `TrainState`;
* ``score_logps``: the reference/self-annotation log-prob pass (`make_compute_logps`) on the
  rows the pipeline's `Scorer` scores per call;
* ``generate``: the KV-cache sampler on ``sampling.batch_size`` prompts of
  ``data.max_prompt_length`` tokens, ``sampling.num_samples`` samples of
  ``sampling.max_new_tokens``.

For each it reports per-chip HBM (XLA's memory analysis), whether it fits the chip, the compile
time, flops and HBM bytes per chip, a roofline step time, tokens/s and MFU.

Counting. ``flops`` are model flops, analytic: a matmul parameter costs 2 flops per token
forward and 4 backward (``6 * params * tokens`` for a train step, the input embedding table
excluded as it is a lookup), plus attention's ``QK^T`` and ``PV`` (``4 * T * heads * head_dim``
per token and layer forward, counted over the full ``T x T`` square as PaLM's MFU does).
``hardware_flops`` add what the step recomputes: the decoder's forward under ``remat: full``
and the LM head's forward (its vocabulary chunks are always rematerialised).
``bytes_accessed`` comes from the compiled HLO with every ``while`` body (micro-batch
accumulation, vocabulary chunks, scanned layers, decode steps) scaled by its trip count: XLA's
own ``cost_analysis`` counts a loop body once. The roofline step time is
``max(hardware_flops / peak, bytes_accessed / hbm_bandwidth)`` with the chip's published
figures (`CHIPS`); MFU is ``flops / (step_time * peak)``. The roofline ignores collectives and
their overlap, so it bounds the step time from below and MFU from above.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from typing import Any, Sequence

GiB = 1024 ** 3


# ---------------------------------------------------------------------------------------------
# Chips and slices.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU / NVIDIA datasheets)."""

  name: str
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: int  # HBM capacity
  hbm_bandwidth: float  # HBM bytes/s


# One table of the datasheet numbers every estimate uses.
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9),
    "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9),
    "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9),
    "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 80 * 10 ** 9, 3350e9),
    "h200": Chip("NVIDIA H200 SXM", 989e12, 141 * 10 ** 9, 4800e9),
    "a100": Chip("NVIDIA A100 80GB SXM", 312e12, 80 * 10 ** 9, 2039e9),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice: its chip and how libtpu describes its topology."""

  name: str  # Cloud TPU accelerator type, e.g. v5p-32
  chip: str  # key of CHIPS
  topology: str  # libtpu topology name, e.g. v5:2x2x4 (chips per dimension)
  chip_config: str  # "megacore" (v4/v5p: one device per chip) or "default"
  wrap: tuple[bool, bool, bool]  # torus wrap-around per dimension

  @property
  def num_chips(self) -> int:
    return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))


def _slices() -> dict[str, Slice]:
  # v4/v5p names count TensorCores (2 per chip, 3-D torus); v5e/v6e names count chips (2-D).
  no_wrap = (False, False, False)
  three_d = {8: ("2x2x1", no_wrap), 16: ("2x2x2", no_wrap), 32: ("2x2x4", no_wrap),
             64: ("2x4x4", no_wrap), 128: ("4x4x4", (True, True, True))}
  two_d = {8: ("2x4", no_wrap), 16: ("4x4", no_wrap), 32: ("4x8", no_wrap),
           64: ("8x8", no_wrap), 256: ("16x16", (True, True, False))}
  table = {}
  for family, chip, prefix, chip_config, shapes in (
      ("v4", "v4", "v4", "megacore", three_d), ("v5p", "v5p", "v5", "megacore", three_d),
      ("v5litepod", "v5e", "v5e", "default", two_d), ("v6e", "v6e", "v6e", "default", two_d)):
    for size, (shape, wrap) in shapes.items():
      name = f"{family}-{size}"
      table[name] = Slice(name, chip, f"{prefix}:{shape}", chip_config, wrap)
  return table


SLICES: dict[str, Slice] = _slices()


def tpu_slice(name: str) -> Slice:
  """The `Slice` called ``name`` (``v5p-32``); ValueError listing the known names."""
  if name not in SLICES:
    raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(SLICES)}")
  return SLICES[name]


LIBTPU_HINT = ('compiling for TPU needs libtpu: pip install -e ".[tpu]" '
               '(or pip install "jax[tpu]==<the installed jax version>")')


def libtpu_available() -> bool:
  """True when libtpu is importable (the ``tpu`` extra is installed)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec("libtpu") is not None


def topology_devices(slice_: Slice) -> list:
  """The slice's compile-only TPU devices (one per chip), via libtpu; no TPU needed.

  Raises:
    RuntimeError: libtpu is missing (with the install command) or rejects the topology.
  """
  if not libtpu_available():
    raise RuntimeError(f"libtpu is not installed; {LIBTPU_HINT}")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=slice_.topology, chip_config_name=slice_.chip_config,
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=slice_.wrap)
  except Exception as e:  # libtpu raises plain runtime errors
    raise RuntimeError(f"libtpu could not describe {slice_.name} ({slice_.topology}): {e}") from e
  devices = list(topo.devices)
  if len(devices) != slice_.num_chips:
    raise RuntimeError(f"libtpu gave {len(devices)} devices for {slice_.name}; expected "
                       f"{slice_.num_chips} chips")
  return devices


# ---------------------------------------------------------------------------------------------
# Counting flops and bytes in compiled HLO, loops scaled by their trip counts.
# ---------------------------------------------------------------------------------------------

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
                "f8e5m2fnuz": 1, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$")
_OPERAND = re.compile(r"%([\w.\-]+)")
# Ops that move no HBM bytes of their own (views, plumbing, loop/call wrappers, async halves).
_FREE_OPS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while",
             "conditional", "call", "after-all", "opt-barrier", "partition-id", "replica-id",
             "add-dependency", "domain"}
_SLICE_OPS = ("dynamic-slice", "slice", "gather")


def _array_dims(text: str) -> list[tuple[str, list[int]]]:
  return [(m.group(1), [int(d) for d in m.group(2).split(",") if d])
          for m in _ARRAY.finditer(text) if m.group(1) in _DTYPE_BYTES]


def _shape_bytes(text: str) -> float:
  return sum(_DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _array_dims(text))


def _split_type(rest: str) -> tuple[str, str]:
  """``"f32[2]{0} add(%a, %b), k=v"`` -> (type text, the remainder from the op name)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


@dataclasses.dataclass
class _Instr:
  name: str
  type: str
  op: str
  args: str  # the text between the op's parentheses
  operands: list[str]
  attrs: str


def _parse_instruction(line: str) -> _Instr | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  type_text, rest = _split_type(m.group(2))
  op, paren, rest = rest.partition("(")
  if not paren:
    return None
  depth, end = 1, len(rest)
  for i, ch in enumerate(rest):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      end = i
      break
  args = rest[:end]
  return _Instr(m.group(1), type_text, op.strip(), args, _OPERAND.findall(args), rest[end + 1:])


def _parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
  computations: dict[str, list[_Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if line.startswith("}"):
      current = None
      continue
    instr = _parse_instruction(line)
    if instr is not None:
      computations[current].append(instr)
  return computations, entry


def _attr_computations(attrs: str, key: str) -> list[str]:
  m = re.search(r"\b" + key + r"=(\{[^}]*\}|%[\w.\-]+)", attrs)
  return _OPERAND.findall(m.group(1)) if m else []


def _trip_count(attrs: str) -> int | None:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
  return int(m.group(1)) if m else None


def _condition_bound(comps: dict[str, list[_Instr]], conditions: list[str]) -> int | None:
  """The loop bound of a ``while`` whose trip count XLA did not annotate (TPU): the largest
  integer scalar constant its condition compares against (``i < N``), fused or not."""
  bounds, todo, seen = [], list(conditions), set()
  while todo:
    comp = todo.pop()
    if comp in seen:
      continue
    seen.add(comp)
    for i in comps.get(comp, []):
      if i.op == "constant" and re.match(r"[su](32|64)\[\]", i.type) and i.args.isdigit():
        bounds.append(int(i.args))
      todo.extend(_attr_computations(i.attrs, "calls"))
  return max(bounds) if bounds else None


@dataclasses.dataclass(frozen=True)
class HloCost:
  """Per-device totals of one compiled program, loops scaled by their trip counts."""

  bytes_accessed: float  # operand + result bytes of every top-level (unfused) op
  unknown_loops: int  # while loops without a known trip count (scaled by the default)


def _fusion_access(name: str, comps: dict[str, list[_Instr]], shapes: dict[str, dict[str, str]],
                   memo: dict) -> tuple[dict[int, float], float | None]:
  """For fused computation ``name``: bytes read of each parameter that is only sliced (by
  argument position), looking through nested fusions (a scanned layer's weight is sliced out of
  the ``[L, ...]`` stack inside an inner fusion), and the bytes written when the root is an
  in-place dynamic-update-slice."""
  if name in memo:
    return memo[name]
  instrs, types = comps.get(name, []), shapes.get(name, {})
  numbers = {i.name: int(i.args) for i in instrs if i.op == "parameter" and i.args.isdigit()}
  sliced: dict[str, float] = {}
  other_use: set[str] = set()
  for i in instrs:
    inner = (_fusion_access(_attr_computations(i.attrs, "calls")[0], comps, shapes, memo)[0]
             if i.op == "fusion" and _attr_computations(i.attrs, "calls") else None)
    for pos, operand in enumerate(i.operands):
      if operand not in numbers:
        continue
      if i.op in _SLICE_OPS and pos == 0:
        sliced[operand] = sliced.get(operand, 0.0) + _shape_bytes(i.type)
      elif i.op == "dynamic-update-slice" and pos == 0:
        sliced.setdefault(operand, 0.0)  # updated in place: not read
      elif inner is not None and pos in inner:
        sliced[operand] = sliced.get(operand, 0.0) + inner[pos]
      else:
        other_use.add(operand)
  root = instrs[-1] if instrs else None
  write = None
  if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
    write = _shape_bytes(types.get(root.operands[1], ""))
  memo[name] = ({numbers[n]: b for n, b in sliced.items() if n not in other_use}, write)
  return memo[name]


def hlo_cost(hlo_text: str, *, unknown_trip_count: int = 1) -> HloCost:
  """HBM bytes accessed by an optimized HLO module (``compiled.as_text()``), per device.

  A ``while`` body and condition count ``known_trip_count`` times, else the bound its
  condition compares against (TPU HLO carries no annotation), else ``unknown_trip_count``.
  Bytes follow XLA's convention: operands plus results of each top-level (unfused) op, where
  a fused operand that is only sliced counts its slices and an in-place dynamic-update-slice
  counts its update. (Flops come from the model instead: TPU lowers matmuls to convolutions.)
  """
  comps, entry = _parse_hlo(hlo_text)
  shapes = {c: {i.name: i.type for i in instrs} for c, instrs in comps.items()}
  access = {}
  totals = {"bytes": 0.0, "unknown": 0}

  def op_bytes(comp: str, i: _Instr) -> float:
    operand_bytes = [_shape_bytes(shapes[comp].get(o, "")) for o in i.operands]
    if i.op in _SLICE_OPS:
      return 2 * _shape_bytes(i.type)
    if i.op == "dynamic-update-slice":
      return 2 * (operand_bytes[1] if len(operand_bytes) > 1 else 0.0)
    called = _attr_computations(i.attrs, "calls") if i.op == "fusion" else []
    if not called:
      return sum(operand_bytes) + _shape_bytes(i.type)
    sliced, write = _fusion_access(called[0], comps, shapes, access)
    read = sum(sliced.get(pos, b) for pos, b in enumerate(operand_bytes))
    return read + (_shape_bytes(i.type) if write is None else write)

  def visit(comp: str, mult: float, fused: bool):
    for i in comps.get(comp, []):
      if i.op == "while":
        trip = _trip_count(i.attrs)
        if trip is None:
          trip = _condition_bound(comps, _attr_computations(i.attrs, "condition"))
        if trip is None:
          totals["unknown"] += 1
          trip = unknown_trip_count
        for key in ("body", "condition"):
          for c in _attr_computations(i.attrs, key):
            visit(c, mult * trip, False)
        continue
      if i.op == "fusion":
        for c in _attr_computations(i.attrs, "calls"):
          visit(c, mult, True)
      elif i.op == "call":
        for c in _attr_computations(i.attrs, "to_apply"):
          visit(c, mult, fused)
      elif i.op == "conditional":
        for key in ("branch_computations", "true_computation", "false_computation"):
          for c in _attr_computations(i.attrs, key):
            visit(c, mult, fused)
      elif i.op.endswith("-start"):
        for c in _attr_computations(i.attrs, "calls"):
          visit(c, mult, fused)
      if fused or i.op in _FREE_OPS or i.op.endswith("-done"):
        continue
      totals["bytes"] += mult * op_bytes(comp, i)

  visit(entry, 1.0, False)
  return HloCost(bytes_accessed=totals["bytes"], unknown_loops=totals["unknown"])


# ---------------------------------------------------------------------------------------------
# Model flops (analytic).
# ---------------------------------------------------------------------------------------------


def forward_flops(config, num_tokens: float, context: float) -> float:
  """Model flops of a forward pass (the model config's own count, `CausalLMConfig.forward_flops`)."""
  return config.forward_flops(num_tokens, context)


def train_step_flops(config, train_config, seq_len: int) -> float:
  """Model flops of one optimizer step (all chips): forward and backward (3x forward) over the
  chosen and rejected sequences of ``global_batch_size`` pairs, plus the frozen reference's
  forward when it runs in the step. Equals ``6 * matmul_params * tokens`` plus attention."""
  tokens = 2 * train_config.global_batch_size * seq_len
  passes = 3 + (train_config.reference == "in_step")
  return passes * forward_flops(config, tokens, seq_len)


def train_step_hardware_flops(config, train_config, seq_len: int) -> float:
  """`train_step_flops` plus recomputation: the decoder's forward again under ``remat: full``
  and the LM head's forward (its vocabulary-chunk scan is rematerialised in the backward)."""
  tokens = 2 * train_config.global_batch_size * seq_len
  head = 2.0 * config.vocab_size * config.hidden_size * tokens
  decoder = forward_flops(config, tokens, seq_len) - head
  return (train_step_flops(config, train_config, seq_len) + head
          + (decoder if train_config.remat == "full" else 0.0))


def generate_flops(config, rows: int, prompt_len: int, new_tokens: int) -> float:
  """Model flops of sampling ``new_tokens`` for ``rows`` prompts of ``prompt_len`` tokens:
  the prefill, then one token per step attending to the prompt and the tokens so far."""
  prefill = forward_flops(config, rows * prompt_len, prompt_len)
  decode = forward_flops(config, rows * new_tokens, prompt_len + (new_tokens + 1) / 2)
  return prefill + decode


# ---------------------------------------------------------------------------------------------
# The programs, compiled against abstract state.
# ---------------------------------------------------------------------------------------------


def load_experiment(path: str, overrides: Sequence[str] = ()):
  """The experiment config of ``path`` plus dotted overrides (the one place plan reads configs)."""
  from ssapo_jax.experiment import load_experiment as load  # pylint: disable=import-outside-toplevel
  return load(path, overrides)


def model_config(experiment, *, arch: str | None = None, num_layers: int | None = None):
  """The policy's `LlamaConfig` with the train config's dtypes and remat.

  The architecture is the preset ``arch`` (`ssapo_jax.models.presets`) or, without it, the
  ``config.json`` in ``model.path``. ``num_layers`` truncates the decoder (quick plans).
  """
  from ssapo_jax.models import LlamaConfig  # pylint: disable=import-outside-toplevel
  from ssapo_jax.models.params import read_config  # pylint: disable=import-outside-toplevel
  from ssapo_jax.models.presets import preset  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  if arch is not None:
    config = preset(arch)
  elif os.path.isfile(os.path.join(experiment.model.path, "config.json")):
    config = LlamaConfig.from_hf(read_config(experiment.model.path))
  else:
    from ssapo_jax.models.presets import PRESETS  # pylint: disable=import-outside-toplevel
    raise ValueError(f"model.path {experiment.model.path!r} has no config.json; pass --arch with "
                     f"one of {', '.join(PRESETS)} to plan without the checkpoint")
  t = experiment.train
  # "auto" resolves when traced under the slice's mesh: splash, as on the TPU itself.
  changes = dict(dtype=t.compute_dtype, param_dtype=t.param_dtype, remat=t.remat,
                 attention=experiment.model.attention)
  if num_layers is not None:
    changes["num_layers"] = num_layers
    if config.layer_types:
      changes["layer_types"] = (config.layer_types * num_layers)[:num_layers]
  return dataclasses.replace(config, **changes)


def _abstract_model(config):
  from ssapo_jax.models import build_model  # pylint: disable=import-outside-toplevel
  return build_model(config, abstract=True)


def abstract_batch(train_config, mesh, *, seq_len: int, num_atoms: int = 1):
  """The global `PreferenceBatch` the train step takes, as sharded ``ShapeDtypeStruct``s:
  ``[global_batch_size, seq_len]`` int32 tokens, ``[global_batch_size]`` float32 columns and
  ``[global_batch_size, num_atoms]`` float32 follower atoms (`PreferenceLoader`'s dtypes)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel
  from ssapo_jax.batch import PreferenceBatch  # pylint: disable=import-outside-toplevel
  b = train_config.global_batch_size
  tok = jax.ShapeDtypeStruct((b, seq_len), jnp.int32)
  vec = jax.ShapeDtypeStruct((b,), jnp.float32)
  atom = jax.ShapeDtypeStruct((b, num_atoms), jnp.float32)
  batch = PreferenceBatch(chosen_ids=tok, chosen_mask=tok, chosen_loss_mask=tok,
                          rejected_ids=tok, rejected_mask=tok, rejected_loss_mask=tok,
                          weights=vec, valid=vec, ref_chosen_logps=vec, ref_rejected_logps=vec,
                          atom_weights=atom, atom_shifts=atom)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch,
                      tr.batch_shardings(mesh, train_config))


def lower_train_step(train_config, config, mesh, *, seq_len: int, num_atoms: int = 1,
                     num_train_steps: int = 1000):
  """``(lowered, tokens)`` of the run's train step: `train.create_train_state` (abstract) and
  `train.make_train_step`, the functions the run calls, on a global batch of
  ``[global_batch_size, seq_len]`` pairs with ``num_atoms`` atoms."""
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel
  t = train_config
  state = tr.create_train_state(_abstract_model(config), t, mesh,
                                num_train_steps=num_train_steps, abstract=True)
  step = tr.make_train_step(t, mesh, state)  # traces under the mesh (splash, shard_map)
  batch = abstract_batch(t, mesh, seq_len=seq_len, num_atoms=num_atoms)
  return step.lower(state, batch), 2 * t.global_batch_size * seq_len


def lower_score_logps(config, mesh, *, rows: int, seq_len: int):
  """``(lowered, tokens)`` of the run's scoring pass (`train.Scorer.lower`: reference
  log-probs, annotation) over ``[rows, seq_len]`` sequences in the model's compute dtype."""
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel
  scorer = tr.Scorer(mesh, 0, rows, compute_dtype=config.dtype)
  return scorer.lower(_abstract_model(config), seq_len), rows * seq_len


def lower_generate(sampling_config, config, mesh, *, prompt_len: int):
  """``(lowered, new tokens)`` of the run's sampler (`sampling.Sampler.lower`) on one batch of
  ``prompt_len``-token prompts: prompts over the batch axes, parameters in the decode layout."""
  from ssapo_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel
  s = sampling_config
  sampler = Sampler(mesh, s, pad_token_id=int(config.pad_token_id or 0),
                    eos_token_ids=tuple(config.eos_token_ids or (0,)))
  return (sampler.lower(_abstract_model(config), prompt_len),
          s.batch_size * s.num_samples * s.max_new_tokens)


PROGRAMS = ("train_step", "score_logps", "generate")


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
  """What one compiled program needs and achieves on one chip (bytes, flops per chip)."""

  name: str
  tokens: int  # tokens per call over all chips (train: 2 * batch * length; generate: new ones)
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  code_bytes: int
  capacity_bytes: int
  compile_seconds: float  # wall clock of tracing, lowering and compiling
  compile_cpu_seconds: float  # CPU time of the same (all threads): comparable on a busy machine
  flops: float  # model flops per chip per call (analytic)
  hardware_flops: float  # flops per chip including recomputation (analytic)
  bytes_accessed: float  # HBM bytes per chip in the compiled HLO (loops scaled)
  peak_flops: float
  hbm_bandwidth: float

  @property
  def total_bytes(self) -> int:
    """Peak HBM of the program: live arguments, outputs not aliased to them, temporaries, code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.capacity_bytes

  @property
  def headroom(self) -> float:
    """Free fraction of the chip's HBM (negative when it does not fit)."""
    return 1.0 - self.total_bytes / self.capacity_bytes

  @property
  def step_seconds(self) -> float:
    """Roofline time: the slower of compute at peak and HBM traffic at full bandwidth."""
    return max(self.hardware_flops / self.peak_flops,
               self.bytes_accessed / self.hbm_bandwidth)

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.step_seconds

  @property
  def mfu(self) -> float:
    """Model flops utilisation at the roofline step time."""
    return self.flops / (self.step_seconds * self.peak_flops)

  def to_json(self) -> dict[str, Any]:
    return {
        "hbm_argument_bytes": self.argument_bytes, "hbm_temp_bytes": self.temp_bytes,
        "hbm_output_bytes": self.output_bytes, "hbm_alias_bytes": self.alias_bytes,
        "hbm_code_bytes": self.code_bytes, "hbm_total_bytes": self.total_bytes,
        "hbm_capacity_bytes": self.capacity_bytes, "fits": self.fits,
        "headroom": self.headroom, "compile_seconds": self.compile_seconds,
        "compile_cpu_seconds": self.compile_cpu_seconds,
        "flops": self.flops, "hardware_flops": self.hardware_flops, "bytes_accessed": self.bytes_accessed,
        "step_seconds": self.step_seconds, "tokens": self.tokens,
        "tokens_per_second": self.tokens_per_second, "estimated_mfu": self.mfu,
    }


def compile_program(name: str, lower, chip: Chip, num_chips: int, model_flops: float,
                    hardware_flops: float, *, unknown_trip_count: int = 1) -> ProgramPlan:
  """Lowers (``lower() -> (lowered, tokens)``) and compiles one program and measures it."""
  start, start_cpu = time.perf_counter(), time.process_time()
  lowered, tokens = lower()
  compiled = lowered.compile()
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  memory = compiled.memory_analysis()
  cost = hlo_cost(compiled.as_text(), unknown_trip_count=unknown_trip_count)
  return ProgramPlan(
      name=name, tokens=int(tokens), argument_bytes=int(memory.argument_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes),
      code_bytes=int(memory.generated_code_size_in_bytes), capacity_bytes=chip.hbm_bytes,
      compile_seconds=seconds, compile_cpu_seconds=cpu_seconds, flops=model_flops / num_chips,
      hardware_flops=hardware_flops / num_chips,
      bytes_accessed=cost.bytes_accessed, peak_flops=chip.peak_flops,
      hbm_bandwidth=chip.hbm_bandwidth)


def plan(experiment, config, devices, chip: Chip, *, programs: Sequence[str] = PROGRAMS,
         log=None) -> list[ProgramPlan]:
  """Compiles ``programs`` of ``experiment`` with architecture ``config`` for ``devices``."""
  from ssapo_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel
  mesh = shd.make_mesh(experiment.mesh, devices)
  t, s, d = experiment.train, experiment.sampling, experiment.data
  rows = tr.scoring_batch_size(t, mesh)
  atoms = experiment.dro.num_pieces if t.objective == "robust" else 1
  score = forward_flops(config, rows * d.max_length, d.max_length)
  sample = generate_flops(config, s.batch_size * s.num_samples, d.max_prompt_length,
                          s.max_new_tokens)
  builders = {  # name: (lower, model flops, hardware flops, trip count of an unbounded loop)
      "train_step": (lambda: lower_train_step(t, config, mesh, seq_len=d.max_length,
                                              num_atoms=atoms),
                     train_step_flops(config, t, d.max_length),
                     train_step_hardware_flops(config, t, d.max_length), 1),
      "score_logps": (lambda: lower_score_logps(config, mesh, rows=rows, seq_len=d.max_length),
                      score, score, 1),
      "generate": (lambda: lower_generate(s, config, mesh, prompt_len=d.max_prompt_length),
                   sample, sample,
                   s.max_new_tokens),
  }
  out = []
  for name in programs:
    if log is not None:
      log(f"compiling {name} ...")
    lower, flops, hardware, trips = builders[name]
    out.append(compile_program(name, lower, chip, len(devices), flops, hardware,
                               unknown_trip_count=trips))
    if log is not None:
      p = out[-1]
      log(f"{name}: {p.total_bytes / GiB:.2f} GiB of {p.capacity_bytes / GiB:.1f} GiB per chip "
          f"({'fits' if p.fits else 'does NOT fit'}), compiled in {p.compile_seconds:.0f} s, "
          f"roofline MFU {100 * p.mfu:.0f}%")
  return out


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def format_table(plans: Sequence[ProgramPlan]) -> str:
  """A fixed-width table of the plans, one row per program."""
  head = ("program", "args GiB", "temp GiB", "out GiB", "alias GiB", "total GiB", "cap GiB",
          "fits", "headroom", "compile s", "cpu s", "TFLOP/chip", "HW TFLOP", "GB/chip", "step ms",
          "tokens/s", "MFU")
  rows = [head]
  for p in plans:
    rows.append((p.name, f"{p.argument_bytes / GiB:.2f}", f"{p.temp_bytes / GiB:.2f}",
                 f"{p.output_bytes / GiB:.2f}", f"{p.alias_bytes / GiB:.2f}",
                 f"{p.total_bytes / GiB:.2f}", f"{p.capacity_bytes / GiB:.1f}",
                 "yes" if p.fits else "NO", f"{100 * p.headroom:.0f}%",
                 f"{p.compile_seconds:.0f}", f"{p.compile_cpu_seconds:.0f}",
                 f"{p.flops / 1e12:.2f}", f"{p.hardware_flops / 1e12:.2f}",
                 f"{p.bytes_accessed / 1e9:.1f}", f"{1e3 * p.step_seconds:.1f}",
                 f"{p.tokens_per_second:,.0f}", f"{100 * p.mfu:.0f}%"))
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
           for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="ssapo-plan",
      description="Compile a config's train step, scoring pass and sampler for a TPU slice "
                  "ahead of time (no TPU, no weights) and report HBM, flops and a roofline.")
  p.add_argument("config", help="experiment YAML")
  p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batches=2")
  p.add_argument("--topology", required=True,
                 help=f"Cloud TPU slice: {', '.join(SLICES)}")
  p.add_argument("--arch", default=None,
                 help="architecture preset (mistral-7b, llama3-8b, llama3.2-3b, llama3.2-1b) when model.path "
                      "holds no config.json")
  p.add_argument("--num-layers", type=int, default=None,
                 help="plan a model truncated to this many decoder layers (quick checks)")
  p.add_argument("--programs", default=",".join(PROGRAMS),
                 help=f"comma-separated subset of {','.join(PROGRAMS)}")
  p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
  return p.parse_args(argv)


def main(argv=None) -> int:
  """Entry point of ``ssapo-plan``; exit status 1 when a program does not fit, 2 on bad input."""
  args = parse_args(argv)
  programs = [name for name in args.programs.split(",") if name]
  try:
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
      raise ValueError(f"--programs: unknown {unknown}; choose from {', '.join(PROGRAMS)}")
    slice_ = tpu_slice(args.topology)
    experiment = load_experiment(args.config, args.overrides)
    config = model_config(experiment, arch=args.arch, num_layers=args.num_layers)
    devices = topology_devices(slice_)
  except (ValueError, RuntimeError) as e:
    print(f"ssapo-plan: {e}", file=sys.stderr)
    return 2
  chip = CHIPS[slice_.chip]
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  log(f"{slice_.name}: {slice_.num_chips} x {chip.name} ({slice_.topology}); "
      f"{config.model_type} {config.num_layers} layers, {config.matmul_params() / 1e9:.2f}B "
      "matmul parameters")
  plans = plan(experiment, config, devices, chip, programs=programs, log=log)
  print(format_table(plans))
  if args.json:
    from ssapo_jax import sharding as shd  # pylint: disable=import-outside-toplevel
    mesh_shape = shd.resolve_mesh_shape(experiment.mesh, len(devices))
    report = {
        "config": args.config, "overrides": list(args.overrides), "topology": slice_.name,
        "libtpu_topology": slice_.topology, "chip": chip.name, "num_chips": slice_.num_chips,
        "mesh": dict(zip(shd.MESH_AXES, mesh_shape)), "model_type": config.model_type,
        "num_layers": config.num_layers, "matmul_params": config.matmul_params(),
        "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth,
        "programs": {p.name: p.to_json() for p in plans},
    }
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  too_big = [p for p in plans if not p.fits]
  for p in too_big:
    print(f"ssapo-plan: {p.name} does not fit {slice_.name}: needs {p.total_bytes / GiB:.1f} GiB "
          f"of HBM per chip, the chip has {p.capacity_bytes / GiB:.1f} GiB", file=sys.stderr)
  return 1 if too_big else 0


if __name__ == "__main__":
  sys.exit(main())
