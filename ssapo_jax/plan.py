"""``ssapo-plan``: compile a config's programs for a TPU slice ahead of time, on a CPU machine.

For a Cloud TPU slice name (``v5p-32``, ``v4-32``, ``v5litepod-64``, ...) the plan builds the
slice's devices with ``jax.experimental.topologies`` (through libtpu, no TPU needed), a mesh of
them as the config asks, and abstract state (``jax.ShapeDtypeStruct`` with `NamedSharding`s,
no weights). It compiles the three programs a run executes:

* ``train_step``: the real jitted `ssapo_jax.train.train_step` (configured mesh, global batch,
  micro-batches, remat, dtypes, ``data.max_length``) on a donated `TrainState`;
* ``score_logps``: the reference/self-annotation log-prob pass of the run's `Scorer` on its
  largest call (packed rows with ``data.packing``, else the padded rows it scores per call);
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
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

GiB = 1024**3


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
  link_bandwidth: float = 0.0  # interconnect bytes/s per link and direction (ICI, NVLink)
  links: int = 0  # interconnect links per chip (ICI: 2 per torus dimension)
  hop_latency: float = 1e-6  # seconds per collective step (one hop of a ring)
  node_size: int = 0  # GPUs per NVLink domain (0: a TPU torus)
  scale_out_bandwidth: float = 0.0  # bytes/s per GPU and direction between nodes (InfiniBand)


# One table of the datasheet numbers every estimate uses. ICI per link and direction: v5p's
# 1,200 GB/s bidirectional per chip over 6 links is 100 GB/s (9e10 used, as the JAX scaling
# book's table); v4 and v5e 4.5e10, v6e 9e10. GPUs: NVLink through the node's switches is one
# all-to-all lane per GPU (H100/H200: 18 links x 25 GB/s = 450 GB/s per direction; A100 300),
# and 400 Gb/s InfiniBand per GPU between nodes (50 GB/s).
CHIPS: dict[str, Chip] = {
  "v4": Chip("TPU v4", 275e12, 32 * GiB, 1228e9, 4.5e10, 6),
  "v5e": Chip("TPU v5e", 197e12, 16 * GiB, 819e9, 4.5e10, 4),
  "v5p": Chip("TPU v5p", 459e12, 95 * GiB, 2765e9, 9e10, 6),
  "v6e": Chip("TPU v6e", 918e12, 32 * GiB, 1640e9, 9e10, 4),
  "h100": Chip("NVIDIA H100 SXM", 989e12, 80 * 10**9, 3350e9, 450e9, 1, 1e-5, 8, 50e9),
  "h200": Chip("NVIDIA H200 SXM", 989e12, 141 * 10**9, 4800e9, 450e9, 1, 1e-5, 8, 50e9),
  "a100": Chip("NVIDIA A100 80GB SXM", 312e12, 80 * 10**9, 2039e9, 300e9, 1, 1e-5, 8, 25e9),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A Cloud TPU slice (or GPU nodes): its chip and how the compiler describes its topology."""

  name: str  # Cloud TPU accelerator type, e.g. v5p-32; GPU nodes: h100-8, h200-16, ...
  chip: str  # key of CHIPS
  topology: str  # libtpu topology name, e.g. v5:2x2x4 (chips per dimension); GPU: 1x<nodes>x8
  chip_config: str  # "megacore" (v4/v5p: one device per chip) or "default"; GPU: ""
  wrap: tuple[bool, ...]  # torus wrap-around per dimension
  platform: str = "tpu"  # "tpu" or "cuda"

  @property
  def num_chips(self) -> int:
    return math.prod(int(d) for d in self.topology.split(":")[-1].split("x"))

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host per dimension: 2x2x1 (a four-chip host), less on a single-chip slice."""
    dims = [int(d) for d in self.topology.split(":")[-1].split("x")] + [1]
    return tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))


def _slices() -> dict[str, Slice]:
  # v4/v5p names count TensorCores (2 per chip, 3-D torus); v5e/v6e names count chips (2-D).
  no_wrap = (False, False, False)
  three_d = {
    2: ("1x1x1", no_wrap),  # one chip (two TensorCores): a single-device stand-in
    8: ("2x2x1", no_wrap),
    16: ("2x2x2", no_wrap),
    32: ("2x2x4", no_wrap),
    64: ("2x4x4", no_wrap),
    128: ("4x4x4", (True, True, True)),
  }
  two_d = {
    1: ("1x1", no_wrap),  # one chip: v5litepod-1, v6e-1
    8: ("2x4", no_wrap),
    16: ("4x4", no_wrap),
    32: ("4x8", no_wrap),
    64: ("8x8", no_wrap),
    256: ("16x16", (True, True, False)),
  }
  table = {}
  for family, chip, prefix, chip_config, shapes in (
    ("v4", "v4", "v4", "megacore", three_d),
    ("v5p", "v5p", "v5", "megacore", three_d),
    ("v5litepod", "v5e", "v5e", "default", two_d),
    ("v6e", "v6e", "v6e", "default", two_d),
  ):
    for size, (shape, wrap) in shapes.items():
      name = f"{family}-{size}"
      table[name] = Slice(name, chip, f"{prefix}:{shape}", chip_config, wrap)
  # GPU nodes of 8 (NVLink inside a node), and one GPU (a single-GPU LoRA run): the CUDA
  # plugin's mock topology "<slices>x<nodes>x<GPUs per node>", compiled against a target
  # description (no GPU needed).
  for chip in ("h100", "h200"):
    table[f"{chip}-1"] = Slice(f"{chip}-1", chip, "1x1x1", "", (), platform="cuda")
    for nodes in (1, 2, 4, 8):
      name = f"{chip}-{8 * nodes}"
      table[name] = Slice(name, chip, f"1x{nodes}x8", "", (), platform="cuda")
  return table


SLICES: dict[str, Slice] = _slices()


def tpu_slice(name: str) -> Slice:
  """The `Slice` called ``name`` (``v5p-32``, ``h100-8``); ValueError listing the known names."""
  if name not in SLICES:
    raise ValueError(f"unknown TPU slice {name!r}; known: {', '.join(SLICES)}")
  return SLICES[name]


LIBTPU_HINT = (
  'compiling for TPU needs libtpu: pip install -e ".[tpu]" '
  '(or pip install "jax[tpu]==<the installed jax version>")'
)


def libtpu_available() -> bool:
  """True when libtpu is importable (the ``tpu`` extra is installed)."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  return importlib.util.find_spec("libtpu") is not None


GPU_HINT = (
  "compiling for a GPU without one needs the CUDA PJRT plugin (no CUDA libraries): "
  'pip install -e ".[gpu-plan]" (jax-cuda12-plugin and jax-cuda12-pjrt of the '
  "installed jax version)"
)


def cuda_plugin_available() -> bool:
  """True when JAX's CUDA PJRT plugin is importable (the ``gpu-plan`` extra)."""
  import importlib.util  # pylint: disable=import-outside-toplevel

  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


def gpu_target_config(chip: Chip) -> str:
  """A ``stream_executor.GpuTargetConfigProto`` (text) describing an SXM Hopper GPU with the
  chip's memory and bandwidth: what XLA compiles against instead of a present device (figures
  from XLA's own ``h100_sxm.txtpb``; the H200 is the same GH100 die with more, faster HBM)."""
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {int(chip.hbm_bytes)}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
    minor: 0
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 8
  patch: 0
}}
device_description_str: "{chip.name}"
"""


def _gpu_devices(slice_: Slice) -> list:
  if not cuda_plugin_available():
    raise RuntimeError(f"the CUDA plugin is not installed; {GPU_HINT}")
  # The plugin checks the local CUDA libraries when it registers; compiling needs none.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  try:
    topo = topologies.get_topology_desc(
      platform="cuda",
      topology_name="",
      topology=slice_.topology,
      target_config=gpu_target_config(CHIPS[slice_.chip]),
    )
  except Exception as e:  # the plugin raises JaxRuntimeError / NotImplementedError
    raise RuntimeError(
      f"the CUDA plugin could not describe {slice_.name} ({slice_.topology}): {e}"
    ) from e
  return list(topo.devices)


def topology_devices(slice_: Slice) -> list:
  """The slice's compile-only devices (one per chip): TPU via libtpu, GPU via the CUDA PJRT
  plugin and a target description (`gpu_target_config`); no accelerator needed.

  Raises:
    RuntimeError: libtpu (or the CUDA plugin) is missing, with the install command, or rejects
      the topology.
  """
  if slice_.platform == "cuda":
    devices = _gpu_devices(slice_)
    if len(devices) != slice_.num_chips:
      raise RuntimeError(
        f"the CUDA plugin gave {len(devices)} devices for {slice_.name}; "
        f"expected {slice_.num_chips}"
      )
    return devices
  if not libtpu_available():
    raise RuntimeError(f"libtpu is not installed; {LIBTPU_HINT}")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  try:
    topo = topologies.get_topology_desc(
      platform="tpu",
      topology_name=slice_.topology,
      chip_config_name=slice_.chip_config,
      chips_per_host_bounds=slice_.host_bounds,
      num_slices=1,
      wrap=slice_.wrap,
    )
  except Exception as e:  # libtpu raises plain runtime errors
    raise RuntimeError(f"libtpu could not describe {slice_.name} ({slice_.topology}): {e}") from e
  devices = list(topo.devices)
  if len(devices) != slice_.num_chips:
    raise RuntimeError(
      f"libtpu gave {len(devices)} devices for {slice_.name}; expected {slice_.num_chips} chips"
    )
  return devices


# ---------------------------------------------------------------------------------------------
# Counting flops and bytes in compiled HLO, loops scaled by their trip counts.
# ---------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "f8e4m3b11fnuz": 1,
  "f8e4m3fnuz": 1,
  "f8e5m2fnuz": 1,
  "token": 0,
}
# An array type and its optional layout, e.g. ``bf16[8,128]{1,0:T(8,128)(2,1)S(1)}``.
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*\})?")
# A layout's memory space: S(0) (or none) is HBM; S(1) is on-chip memory (VMEM on TPU).
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s+->\s+.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s+=\s+(.*)$", re.DOTALL)
_OPERAND = re.compile(r"%([\w.\-]+)")
_SCALAR_INT = re.compile(r"^(pred|[su](8|16|32|64))\[\]")
# Ops that move no HBM bytes of their own (views, plumbing, loop/call wrappers, async halves).
_FREE_OPS = {
  "parameter",
  "get-tuple-element",
  "tuple",
  "constant",
  "bitcast",
  "while",
  "conditional",
  "call",
  "after-all",
  "opt-barrier",
  "partition-id",
  "replica-id",
  "add-dependency",
  "domain",
}
_SLICE_OPS = ("dynamic-slice", "slice", "gather")
# Collectives (and the ``-start`` halves of their async forms) and the bytes each chip sends
# per byte of its operand, over a group of n chips: the ring algorithms' volumes.
_COLLECTIVE_VOLUME = {
  "all-gather": lambda n: n - 1,  # receives every other chip's shard of its operand's size
  "reduce-scatter": lambda n: (n - 1) / n,
  "all-reduce": lambda n: 2 * (n - 1) / n,  # a reduce-scatter then an all-gather
  "all-to-all": lambda n: (n - 1) / n,
  "ragged-all-to-all": lambda n: (n - 1) / n,
  "collective-permute": lambda n: 1.0,  # to one peer
  "collective-broadcast": lambda n: 1.0,
}


def _array_dims(text: str, *, hbm_only: bool = False) -> list[tuple[str, list[int]]]:
  out = []
  for m in _ARRAY.finditer(text):
    if m.group(1) not in _DTYPE_BYTES:
      continue
    if hbm_only and m.group(3):
      space = _MEMORY_SPACE.search(m.group(3))
      if space and space.group(1) != "0":
        continue  # on-chip (S(1)) or host memory: no HBM traffic
    out.append((m.group(1), [int(d) for d in m.group(2).split(",") if d]))
  return out


def _shape_bytes(text: str, *, hbm_only: bool = True) -> float:
  """Bytes of the arrays in a type (a tuple type sums its elements); arrays laid out in another
  memory space than HBM (``S(1)``: on-chip) count 0 unless ``hbm_only=False``."""
  return sum(
    _DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _array_dims(text, hbm_only=hbm_only)
  )


def _split_type(rest: str) -> tuple[str, str]:
  """``"f32[2]{0} add(%a, %b), k=v"`` -> (type text, the remainder from the op name)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].lstrip()
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


def _parse_instruction(text: str) -> _Instr | None:
  m = _INSTRUCTION.match(text)
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
  return _Instr(m.group(1), type_text, op.strip(), args, _OPERAND.findall(args), rest[end + 1 :])


def _bracket_scan(line: str, depth: int, in_string: bool) -> tuple[int, bool]:
  """Bracket depth and open-string state after ``line``, brackets inside strings ignored
  (a string attribute may hold a newline, so the state carries across lines)."""
  escaped = False
  for ch in line:
    if in_string:
      if escaped:
        escaped = False
      elif ch == "\\":
        escaped = True
      elif ch == '"':
        in_string = False
    elif ch == '"':
      in_string = True
    elif ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
  return depth, in_string


def parse_hlo(text: str) -> tuple[dict[str, list[_Instr]], str]:
  """``({computation: [instructions]}, entry name)`` of an HLO module's text.

  An instruction may span lines (an attribute string with a newline, as the splash kernel's
  custom call carries): its text runs until its brackets close, outside strings. A
  computation ends at a ``}`` line only between instructions.
  """
  computations: dict[str, list[_Instr]] = {}
  entry, current = "", None
  pending: list[str] = []
  depth, in_string = 0, False
  for line in text.splitlines():
    if pending:
      pending.append(line)
      depth, in_string = _bracket_scan(line, depth, in_string)
      if depth <= 0 and not in_string:
        instr = _parse_instruction("\n".join(pending))
        if instr is not None:
          computations[current].append(instr)
        pending = []
      continue
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = m.group(2)
        computations[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}" and not line[:1].isspace():
      current = None
      continue
    if not _INSTRUCTION.match(line):
      continue
    depth, in_string = _bracket_scan(line, 0, False)
    if depth > 0 or in_string:
      pending = [line]
      continue
    instr = _parse_instruction(line)
    if instr is not None:
      computations[current].append(instr)
  return computations, entry


def _attr_computations(attrs: str, key: str) -> list[str]:
  m = re.search(r"\b" + key + r"=(\{[^}]*\}|%[\w.\-]+)", attrs)
  return _OPERAND.findall(m.group(1)) if m else []


def _attr_int(attrs: str, key: str) -> int | None:
  m = re.search(r"\b" + key + r"=(-?\d+)", attrs)
  return int(m.group(1)) if m else None


_BINARY = {
  "add": lambda a, b: a + b,
  "subtract": lambda a, b: a - b,
  "multiply": lambda a, b: a * b,
  "maximum": max,
  "minimum": min,
  "divide": lambda a, b: int(a / b) if b else None,
  "remainder": lambda a, b: int(math.fmod(a, b)) if b else None,
  "and": lambda a, b: a & b,
  "or": lambda a, b: a | b,
  "xor": lambda a, b: a ^ b,
}
_COMPARE = {
  "LT": lambda a, b: a < b,
  "LE": lambda a, b: a <= b,
  "GT": lambda a, b: a > b,
  "GE": lambda a, b: a >= b,
  "EQ": lambda a, b: a == b,
  "NE": lambda a, b: a != b,
}


class _ScalarEval:
  """Evaluates the integer scalars of a computation (loop counters, bounds, steps) given its
  parameters; anything else (arrays, floats, unknown ops) is None."""

  def __init__(self, comps: dict[str, list[_Instr]]):
    self.comps = comps
    self.by_name = {c: {i.name: i for i in instrs} for c, instrs in comps.items()}

  def root(self, comp: str, params: dict[int, Any]):
    instrs = self.comps.get(comp, [])
    return self.value(comp, instrs[-1].name, params, {}) if instrs else None

  def value(self, comp: str, name: str, params: dict[int, Any], memo: dict):
    if name in memo:
      return memo[name]
    i = self.by_name.get(comp, {}).get(name)
    memo[name] = None  # guards against cycles
    memo[name] = None if i is None else self._eval(comp, i, params, memo)
    return memo[name]

  def _eval(self, comp, i: _Instr, params, memo):
    arg = lambda k: self.value(comp, i.operands[k], params, memo)
    if i.op == "parameter":
      return params.get(int(i.args)) if i.args.strip().isdigit() else None
    if i.op == "tuple":
      return tuple(arg(k) for k in range(len(i.operands)))
    if i.op == "get-tuple-element":
      v, k = arg(0), _attr_int(i.attrs, "index")
      return v[k] if isinstance(v, tuple) and k is not None and k < len(v) else None
    if not _SCALAR_INT.match(i.type):
      return None
    if i.op == "constant":
      text = i.args.strip()
      if text in ("true", "false"):
        return text == "true"
      return int(text) if re.fullmatch(r"-?\d+", text) else None
    if i.op in ("copy", "convert", "bitcast", "reshape") and i.operands:
      return arg(0)
    if i.op in ("fusion", "call"):
      called = _attr_computations(i.attrs, "calls" if i.op == "fusion" else "to_apply")
      if not called:
        return None
      return self.root(called[0], {k: arg(k) for k in range(len(i.operands))})
    if i.op == "negate":
      v = arg(0)
      return None if v is None else -v
    if i.op == "not":
      v = arg(0)
      return None if v is None else (not v if isinstance(v, bool) else ~v)
    if i.op == "select":
      p = arg(0)
      return None if p is None else arg(1 if p else 2)
    if i.op in _BINARY or i.op == "compare":
      a, b = arg(0), arg(1)
      if a is None or b is None:
        return None
      if i.op == "compare":
        m = re.search(r"direction=(\w+)", i.attrs)
        return _COMPARE[m.group(1)](a, b) if m and m.group(1) in _COMPARE else None
      return _BINARY[i.op](a, b)
    return None


def loop_trip_count(
  comps: dict[str, list[_Instr]],
  parent: str,
  loop: _Instr,
  *,
  evaluator: _ScalarEval | None = None,
  limit: int = 1_000_000,
) -> int | None:
  """Trips of the ``while`` instruction ``loop`` in computation ``parent``: XLA's
  ``known_trip_count`` when annotated (CPU/GPU), else found by running the loop's integer
  scalars (the induction variable's start, step and bound, through fusions) until the
  condition fails (TPU HLO carries no annotation). None when the condition depends on
  anything else (data-dependent loops such as a sampler stopping at EOS)."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
  if m:
    return int(m.group(1))
  ev = evaluator or _ScalarEval(comps)
  cond = _attr_computations(loop.attrs, "condition")
  body = _attr_computations(loop.attrs, "body")
  if not cond or not body or not loop.operands:
    return None
  state = ev.value(parent, loop.operands[0], {}, {})
  for trips in range(limit):
    go = ev.root(cond[0], {0: state})
    if go is None:
      return None
    if not go:
      return trips
    state = ev.root(body[0], {0: state})
  return None


def _replica_groups(attrs: str) -> list[tuple[int, ...]] | None:
  """The device groups of a collective: ``{{0,1},{2,3}}`` or the iota form
  ``[G,S]<=[d0,d1,...]T(perm)``; None when it names none (all devices)."""
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if m:
    groups, size = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return [tuple(int(x) for x in row) for row in ids.reshape(groups, size)]
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:  # named mesh axes: one group per index of the axes left out
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m.group(2)) if a in names]
    rest = [k for k in range(len(names)) if k not in chosen]
    ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(rest + chosen)
    size = math.prod(sizes[k] for k in chosen)
    return [tuple(int(x) for x in row) for row in ids.reshape(-1, size)]
  m = re.search(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}", attrs)
  if m and m.group(1).strip():
    return [
      tuple(int(x) for x in g.split(",") if x.strip())
      for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))
    ]
  m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
  if m:
    return [tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1))]
  return None


@dataclasses.dataclass(frozen=True)
class Collective:
  """The collectives of one kind over one device group in a program, per chip, loops scaled."""

  kind: str  # all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute, ...
  group: tuple[int, ...]  # device ids (positions in the program's device assignment) of one group
  count: float  # executions per call of the program
  operand_bytes: float  # bytes of the operands per chip, summed over executions
  wire_bytes: float  # bytes each chip sends over the interconnect (ring volume), summed


@dataclasses.dataclass(frozen=True)
class HloCost:
  """Per-device totals of one compiled program, loops scaled by their trip counts."""

  bytes_accessed: float  # HBM bytes: operands + results of every top-level (unfused) op
  unknown_loops: int  # while loops whose trip count could not be found (scaled by the default)
  on_chip_bytes: float = 0.0  # the same convention's bytes of arrays in on-chip memory (S(1))
  collectives: tuple[Collective, ...] = ()
  instructions: int = 0  # instructions visited (each once, whatever its trip count)
  loops: tuple[tuple[str, int | None], ...] = ()  # (body computation, trip count) per while

  @property
  def wire_bytes(self) -> float:
    return sum(c.wire_bytes for c in self.collectives)


def _fusion_access(
  name: str,
  comps: dict[str, list[_Instr]],
  shapes: dict[str, dict[str, str]],
  memo: dict,
  hbm_only: bool = True,
) -> tuple[dict[int, float], float | None]:
  """For fused computation ``name``: bytes read of each parameter that is only sliced (by
  argument position), looking through nested fusions (a scanned layer's weight is sliced out of
  the ``[L, ...]`` stack inside an inner fusion), and the bytes written when the root is an
  in-place dynamic-update-slice."""
  if (name, hbm_only) in memo:
    return memo[name, hbm_only]
  instrs, types = comps.get(name, []), shapes.get(name, {})
  numbers = {i.name: int(i.args) for i in instrs if i.op == "parameter" and i.args.isdigit()}
  sliced: dict[str, float] = {}
  other_use: set[str] = set()
  for i in instrs:
    inner = (
      _fusion_access(_attr_computations(i.attrs, "calls")[0], comps, shapes, memo, hbm_only)[0]
      if i.op == "fusion" and _attr_computations(i.attrs, "calls")
      else None
    )
    for pos, operand in enumerate(i.operands):
      if operand not in numbers:
        continue
      if i.op in _SLICE_OPS and pos == 0:
        sliced[operand] = sliced.get(operand, 0.0) + _shape_bytes(i.type, hbm_only=hbm_only)
      elif i.op == "dynamic-update-slice" and pos == 0:
        sliced.setdefault(operand, 0.0)  # updated in place: not read
      elif inner is not None and pos in inner:
        sliced[operand] = sliced.get(operand, 0.0) + inner[pos]
      else:
        other_use.add(operand)
  root = instrs[-1] if instrs else None
  write = None
  if root is not None and root.op == "dynamic-update-slice" and len(root.operands) > 1:
    write = _shape_bytes(types.get(root.operands[1], ""), hbm_only=hbm_only)
  memo[name, hbm_only] = ({numbers[n]: b for n, b in sliced.items() if n not in other_use}, write)
  return memo[name, hbm_only]


def hlo_cost(hlo_text: str, *, unknown_trip_count: int | Sequence[int] = 1) -> HloCost:
  """HBM bytes and collectives of an optimized HLO module (``compiled.as_text()``), per device.

  A ``while`` body and condition count `loop_trip_count` times, else ``unknown_trip_count``:
  one number for every such loop, or one per nesting depth among them (entry ``d`` for a loop
  inside ``d`` loops of unknown trip count, the last entry for deeper ones; e.g. the
  sampler's decode steps, then the key blocks each step reads, `sampling.Sampler.loop_trips`).
  Bytes follow XLA's convention: operands plus results of each top-level (unfused) op, where
  a fused operand that is only sliced counts its slices and an in-place dynamic-update-slice
  counts its update; arrays in on-chip memory (``S(1)`` layouts) count nothing. Each
  collective, fused or not, is recorded with its operand bytes and its ring volume per chip
  (`Collective`). (Flops come from the model instead: TPU lowers matmuls to convolutions.)
  """
  comps, entry = parse_hlo(hlo_text)
  shapes = {c: {i.name: i.type for i in instrs} for c, instrs in comps.items()}
  evaluator = _ScalarEval(comps)
  access: dict = {}
  totals = {"bytes": 0.0, "on_chip": 0.0, "unknown": 0, "instructions": 0}
  collectives: dict[tuple[str, tuple[int, ...]], list[float]] = {}
  loops: list[tuple[str, int | None]] = []
  seen: set[str] = set()

  def op_bytes(comp: str, i: _Instr, hbm_only: bool) -> float:
    size = lambda t: _shape_bytes(t, hbm_only=hbm_only)
    operand_bytes = [size(shapes[comp].get(o, "")) for o in i.operands]
    if i.op in _SLICE_OPS:
      return 2 * size(i.type)
    if i.op == "dynamic-update-slice":
      return 2 * (operand_bytes[1] if len(operand_bytes) > 1 else 0.0)
    called = _attr_computations(i.attrs, "calls") if i.op == "fusion" else []
    if not called:
      return sum(operand_bytes) + size(i.type)
    sliced, write = _fusion_access(called[0], comps, shapes, access, hbm_only)
    read = sum(sliced.get(pos, b) for pos, b in enumerate(operand_bytes))
    return read + (size(i.type) if write is None else write)

  def collective(comp: str, i: _Instr, mult: float):
    kind = i.op.removesuffix("-start")
    if kind not in _COLLECTIVE_VOLUME:
      return
    groups = _replica_groups(i.attrs)
    group = groups[0] if groups else ()
    n = len(group) if kind not in ("collective-permute", "collective-broadcast") else 2
    operand = sum(_shape_bytes(shapes[comp].get(o, ""), hbm_only=False) for o in i.operands)
    entry_ = collectives.setdefault((kind, group), [0.0, 0.0, 0.0])
    entry_[0] += mult
    entry_[1] += mult * operand
    entry_[2] += mult * operand * _COLLECTIVE_VOLUME[kind](max(n, 1))

  trips_by_depth = (
    (unknown_trip_count,) if isinstance(unknown_trip_count, int) else tuple(unknown_trip_count)
  )

  def visit(comp: str, mult: float, fused: bool, depth: int = 0):
    first = comp not in seen
    seen.add(comp)
    for i in comps.get(comp, []):
      if first:
        totals["instructions"] += 1
      if i.op == "while":
        trip = loop_trip_count(comps, comp, i, evaluator=evaluator)
        body = _attr_computations(i.attrs, "body")
        if first:
          loops.append((body[0] if body else "", trip))
        inner = depth
        if trip is None:
          totals["unknown"] += 1
          trip, inner = trips_by_depth[min(depth, len(trips_by_depth) - 1)], depth + 1
        for c in _attr_computations(i.attrs, "body"):
          visit(c, mult * trip, False, inner)
        for c in _attr_computations(i.attrs, "condition"):  # tested once more than the body runs
          visit(c, mult * (trip + 1), False, inner)
        continue
      collective(comp, i, mult)
      if i.op == "fusion":
        for c in _attr_computations(i.attrs, "calls"):
          visit(c, mult, True, depth)
      elif i.op == "call":
        for c in _attr_computations(i.attrs, "to_apply"):
          visit(c, mult, fused, depth)
      elif i.op == "conditional":
        for key in ("branch_computations", "true_computation", "false_computation"):
          for c in _attr_computations(i.attrs, key):
            visit(c, mult, fused, depth)
      elif i.op.endswith("-start"):
        for c in _attr_computations(i.attrs, "calls"):
          visit(c, mult, fused, depth)
      if fused or i.op in _FREE_OPS or i.op.endswith("-done"):
        continue
      totals["bytes"] += mult * op_bytes(comp, i, True)
      totals["on_chip"] += mult * (op_bytes(comp, i, False) - op_bytes(comp, i, True))

  visit(entry, 1.0, False)
  return HloCost(
    bytes_accessed=totals["bytes"],
    on_chip_bytes=totals["on_chip"],
    unknown_loops=totals["unknown"],
    collectives=tuple(Collective(k, g, *v) for (k, g), v in sorted(collectives.items())),
    instructions=totals["instructions"],
    loops=tuple(loops),
  )


# ---------------------------------------------------------------------------------------------
# Model flops (analytic).
# ---------------------------------------------------------------------------------------------


def forward_flops(config, num_tokens: float, context: float, *, causal: bool = False) -> float:
  """Model flops of a forward pass over ``num_tokens`` tokens that each attend to ``context``
  keys (the model config's own count, `CausalLMConfig.forward_flops`: PaLM's convention, the
  full ``context x context`` square). ``causal=True`` halves the attention square (MaxText's
  convention): attention flops are linear in the context, so it is the count at half of it."""
  return config.forward_flops(num_tokens, context * (0.5 if causal else 1.0))


def train_step_flops(config, train_config, seq_len: int, *, causal: bool = False) -> float:
  """Model flops of one optimizer step (all chips): forward and backward (3x forward) over the
  chosen and rejected sequences of ``global_batch_size`` pairs, plus the frozen reference's
  forward when it runs in the step. Equals ``6 * matmul_params * tokens`` plus attention."""
  tokens = 2 * train_config.global_batch_size * seq_len
  passes = 3 + (train_config.reference == "in_step")
  return passes * forward_flops(config, tokens, seq_len, causal=causal)


def train_step_hardware_flops(config, train_config, seq_len: int) -> float:
  """`train_step_flops` plus recomputation: the decoder's forward again under ``remat: full``
  and the LM head's forward (its vocabulary-chunk scan is rematerialised in the backward)."""
  tokens = 2 * train_config.global_batch_size * seq_len
  head = 2.0 * config.vocab_size * config.hidden_size * tokens
  decoder = forward_flops(config, tokens, seq_len) - head
  return (
    train_step_flops(config, train_config, seq_len)
    + head
    + (decoder if train_config.remat == "full" else 0.0)
  )


def generate_flops(
  config, rows: int, prompt_len: int, new_tokens: int, *, causal: bool = False
) -> float:
  """Model flops of sampling ``new_tokens`` for ``rows`` prompts of ``prompt_len`` tokens:
  the prefill (its attention square halved under ``causal``), then one token per step attending
  to the prompt and the tokens so far (the keys it reads: the same in both conventions)."""
  prefill = forward_flops(config, rows * prompt_len, prompt_len, causal=causal)
  decode = forward_flops(config, rows * new_tokens, prompt_len + (new_tokens + 1) / 2)
  return prefill + decode


# ---------------------------------------------------------------------------------------------
# Collectives over the interconnect.
# ---------------------------------------------------------------------------------------------


def _ring_lanes(
  group: Sequence[int], coords: Sequence[Sequence[int]] | None, wrap: Sequence[bool]
) -> int:
  """Links (one direction each) a ring collective over ``group`` drives at once per chip.

  Every torus dimension the group spans carries its own ring (XLA's multi-dimensional
  collectives): 2 lanes where the ring closes over a wrap-around link (the group covers the
  whole wrapped dimension, at least 3 chips), else 1 (a ring folded onto a line, or 2 chips
  sharing one link). Without coordinates, one ring (1 lane).
  """
  if not coords or not group or max(group) >= len(coords):
    return 1
  points = [tuple(coords[g]) for g in group]
  extent = [max(c[k] for c in coords) + 1 for k in range(len(points[0]))]
  lanes = 0
  for k in range(len(points[0])):
    span = len({p[k] for p in points})
    if span <= 1:
      continue
    closes = k < len(wrap) and wrap[k] and span == extent[k] and span >= 3
    lanes += 2 if closes else 1
  return max(lanes, 1)


def collective_seconds(
  c: Collective,
  chip: Chip,
  coords: Sequence[Sequence[int]] | None = None,
  wrap: Sequence[bool] = (),
) -> float:
  """Time of collective ``c`` (all its executions) over the chip's links: its ring volume per
  chip over the lanes the group's torus dimensions give (`_ring_lanes`), plus one hop latency
  per ring step (``n - 1`` steps; a permute is one). A model of bandwidth, not a simulation:
  it ignores contention between concurrent collectives and multi-hop routing."""
  if chip.link_bandwidth <= 0:
    return float("nan")
  if chip.node_size:  # GPUs: NVLink inside a node, the scale-out network between nodes
    inside = len({g // chip.node_size for g in c.group}) <= 1
    bandwidth = chip.link_bandwidth if inside else chip.scale_out_bandwidth
    steps = (
      1 if c.kind in ("collective-permute", "collective-broadcast") else max(len(c.group) - 1, 1)
    )
    return c.wire_bytes / bandwidth + c.count * steps * chip.hop_latency
  if c.kind in ("collective-permute", "collective-broadcast"):
    lanes, steps = 1, 1
  else:
    lanes, steps = _ring_lanes(c.group, coords, wrap), max(len(c.group) - 1, 1)
  return c.wire_bytes / (lanes * chip.link_bandwidth) + c.count * steps * chip.hop_latency


# ---------------------------------------------------------------------------------------------
# The programs, compiled against abstract state.
# ---------------------------------------------------------------------------------------------


def load_experiment(path: str, overrides: Sequence[str] = ()):
  """The experiment config of ``path`` plus dotted overrides (the one place plan reads configs)."""
  from ssapo_jax.experiment import load_experiment as load  # pylint: disable=import-outside-toplevel

  return load(path, overrides)


def model_config(experiment, *, arch: str | None = None, num_layers: int | None = None):
  """The policy's model config (its registered family's) with the train config's dtypes and remat.

  The architecture is the preset ``arch`` (`ssapo_jax.models.presets`) or, without it, the
  ``config.json`` in ``model.path``. ``num_layers`` truncates the decoder (quick plans).
  """
  import os  # pylint: disable=import-outside-toplevel

  from ssapo_jax.models import family_for  # pylint: disable=import-outside-toplevel
  from ssapo_jax.models.params import read_config  # pylint: disable=import-outside-toplevel
  from ssapo_jax.models.presets import preset  # pylint: disable=import-outside-toplevel

  if arch is not None:
    config = preset(arch)
  elif os.path.isfile(os.path.join(experiment.model.path, "config.json")):
    hf = read_config(experiment.model.path)
    config = family_for(hf["model_type"]).config_cls.from_hf(hf)
  else:
    from ssapo_jax.models.presets import PRESETS  # pylint: disable=import-outside-toplevel

    raise ValueError(
      f"model.path {experiment.model.path!r} has no config.json; pass --arch with "
      f"one of {', '.join(PRESETS)} to plan without the checkpoint"
    )
  from ssapo_jax.pipeline.residency import held_dtype  # pylint: disable=import-outside-toplevel

  t = experiment.train
  # "auto" resolves when traced under the slice's mesh: splash, as on the TPU itself.
  changes = dict(
    dtype=t.compute_dtype,
    param_dtype=held_dtype(experiment),  # as the run loads it (LoRA: the compute dtype)
    remat=t.remat,
    attention=experiment.model.attention,
    scan_layers=experiment.model.scan_layers,
  )
  if num_layers is not None:
    changes["num_layers"] = num_layers
    if config.layer_types:
      changes["layer_types"] = (config.layer_types * num_layers)[:num_layers]
  return dataclasses.replace(config, **changes)


def _abstract_model(config):
  from ssapo_jax.models import build_model  # pylint: disable=import-outside-toplevel

  return build_model(config, abstract=True)


def abstract_batch(
  train_config, mesh, *, seq_len: int, num_atoms: int = 1, packed_rows: int | None = None
):
  """The global `PreferenceBatch` the train step takes, as sharded ``ShapeDtypeStruct``s of
  ``[global_batch_size, seq_len]`` tokens and ``[global_batch_size, num_atoms]`` atoms: the
  shapes and dtypes of `make_preference_batch`, the constructor the loader uses. With
  ``packed_rows``, the `PackedPreferenceBatch` of ``[packed_rows, seq_len]`` packed tokens
  (``data.packing``) with the same per-pair fields."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel
  from ssapo_jax.batch import (  # pylint: disable=import-outside-toplevel
    PackedPreferenceBatch,
    make_preference_batch,
  )

  b = train_config.global_batch_size
  tokens = np.zeros((b, seq_len), np.int32)
  atoms = np.zeros((b, num_atoms), np.float32)
  batch = make_preference_batch(*[tokens] * 6, atom_weights=atoms, atom_shifts=atoms)
  shardings = tr.batch_shardings(mesh, train_config)
  if packed_rows is not None:
    rows = np.zeros((packed_rows, seq_len), np.int32)
    lengths = np.zeros((b,), np.int32)
    pair_fields = ("weights", "valid", "ref_chosen_logps", "ref_rejected_logps")
    batch = PackedPreferenceBatch(
      **dict.fromkeys(("ids", "segment_ids", "positions", "loss_mask", "sequence_index"), rows),
      chosen_lengths=lengths,
      rejected_lengths=lengths,
      **{k: getattr(batch, k) for k in (*pair_fields, "atom_weights", "atom_shifts")},
    )
    shardings = tr.packed_batch_shardings(mesh, train_config)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), batch, shardings
  )


def packed_train_rows(train_config, mesh) -> int:
  """Rows of the largest packed train batch (the top of the loader's `row_buckets` ladder,
  which holds any batch): the shape whose memory bounds every packed step."""
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel
  from ssapo_jax.batch import row_buckets  # pylint: disable=import-outside-toplevel

  m = train_config.micro_batches
  multiple = tr.packed_row_multiple(mesh, train_config)
  return m * max(row_buckets(train_config.global_batch_size // m, multiple))


def lower_train_step(
  train_config,
  config,
  mesh,
  *,
  seq_len: int,
  num_atoms: int = 1,
  num_train_steps: int = 1000,
  packed_rows: int | None = None,
):
  """``(lowered, tokens)`` of the run's train step: `train.create_train_state` (abstract) and
  `train.make_train_step`, the functions the run calls, on a global batch of
  ``[global_batch_size, seq_len]`` pairs with ``num_atoms`` atoms (with ``packed_rows``, the
  packed step on ``[packed_rows, seq_len]`` rows)."""
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel

  t = train_config
  state = tr.create_train_state(
    _abstract_model(config), t, mesh, num_train_steps=num_train_steps, abstract=True
  )
  # Traces under the mesh (splash, shard_map).
  step = tr.make_train_step(t, mesh, state, packed=packed_rows is not None)
  batch = abstract_batch(t, mesh, seq_len=seq_len, num_atoms=num_atoms, packed_rows=packed_rows)
  tokens = 2 * t.global_batch_size * seq_len if packed_rows is None else packed_rows * seq_len
  return step.lower(state, batch), tokens


def lower_score_logps(experiment, config, mesh):
  """``(lowered, tokens)`` of the run's scoring pass (reference log-probs, annotation): the
  run's own `train.Scorer` (`Scorer.for_experiment`) lowered at its largest call for
  ``data.max_length``-token sequences (`Scorer.largest_shape`: packed rows with
  ``data.packing``)."""
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel

  scorer = tr.Scorer.for_experiment(experiment, mesh, int(config.pad_token_id or 0))
  rows, seq_len = scorer.largest_shape(experiment.data.max_length)
  return scorer.lower(_abstract_model(config), experiment.data.max_length), rows * seq_len


def lower_generate(sampling_config, config, mesh, *, prompt_len: int):
  """``(lowered, new tokens)`` of the run's sampler (`sampling.Sampler.lower`) on one batch of
  ``prompt_len``-token prompts: prompts over the batch axes, parameters in the decode layout."""
  from ssapo_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel

  s = sampling_config
  sampler = Sampler(
    mesh,
    s,
    pad_token_id=int(config.pad_token_id or 0),
    eos_token_ids=tuple(config.eos_token_ids or (0,)),
  )
  return (
    sampler.lower(_abstract_model(config), prompt_len),
    s.refill_batches * s.batch_size * s.num_samples * s.max_new_tokens,
  )


PROGRAMS = ("train_step", "score_logps", "generate")

_UNIT = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OOM_PATTERNS = (  # what XLA needs, then what the chip has
  re.compile(
    r"required for [^()]*\(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM "
    r"\(([\d.]+)([KMGT]?)i?B?\)",
    re.IGNORECASE,
  ),
  re.compile(r"Used ([\d.]+)([KMGT]?)i?B? of ([\d.]+)([KMGT]?)i?B? hbm", re.IGNORECASE),
)


def parse_out_of_memory(message: str) -> tuple[int, int] | None:
  """``(requested bytes, available bytes)`` from XLA's RESOURCE_EXHAUSTED compile error, e.g.
  ``Ran out of memory on HBM, the total memory required for HLO temporaries (20.15G) exceeds
  available HBM (15.75G)`` (libtpu prints binary units); None for any other error."""
  if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
    return None
  for pattern in _OOM_PATTERNS:
    m = pattern.search(message)
    if m:
      return (
        int(float(m.group(1)) * _UNIT[m.group(2).upper()]),
        int(float(m.group(3)) * _UNIT[m.group(4).upper()]),
      )
  return None


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
  """What one compiled program needs and achieves on one chip (bytes, flops per chip).

  A program XLA could not fit (``RESOURCE_EXHAUSTED`` at compile time) has ``error`` set,
  ``requested_bytes`` (what XLA said it needs) and no costs (NaN).
  """

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
  flops: float  # model flops per chip per call, PaLM convention (full T x T attention)
  flops_causal: float  # the same in MaxText's convention (causal attention: half the square)
  hardware_flops: float  # flops per chip including recomputation (analytic)
  bytes_accessed: float  # HBM bytes per chip in the compiled HLO (loops scaled)
  on_chip_bytes: float  # bytes of arrays in on-chip memory (S(1)), not charged to HBM
  wire_bytes: float  # bytes each chip sends over the interconnect per call
  collective_count: float  # collective executions per call
  comm_seconds: float  # the collectives' time over the interconnect (`collective_seconds`)
  unknown_loops: int  # loops whose trip count was not found
  peak_flops: float
  hbm_bandwidth: float
  requested_bytes: int = 0  # from XLA's out-of-memory error (0 when it compiled)
  error: str | None = None  # XLA's out-of-memory message

  @property
  def total_bytes(self) -> int:
    """Peak HBM of the program: live arguments, outputs not aliased to them, temporaries, code
    (what XLA asked for when it did not fit)."""
    if self.error is not None:
      return self.requested_bytes
    return (
      self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes
    )

  @property
  def fits(self) -> bool:
    return self.error is None and self.total_bytes <= self.capacity_bytes

  @property
  def headroom(self) -> float:
    """Free fraction of the chip's HBM (negative when it does not fit)."""
    return 1.0 - self.total_bytes / self.capacity_bytes

  @property
  def compute_seconds(self) -> float:
    return self.hardware_flops / self.peak_flops

  @property
  def hbm_seconds(self) -> float:
    return self.bytes_accessed / self.hbm_bandwidth

  @property
  def step_seconds_overlap(self) -> float:
    """Step time with compute, HBM traffic and collectives perfectly overlapped."""
    return max(self.compute_seconds, self.hbm_seconds, self.comm_seconds)

  @property
  def step_seconds(self) -> float:
    """Step time with no overlap of collectives: the roofline (the slower of compute at peak and
    HBM traffic at full bandwidth) plus the communication time."""
    return max(self.compute_seconds, self.hbm_seconds) + self.comm_seconds

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.step_seconds

  def mfu(self, *, causal: bool = False, overlap: bool = False) -> float:
    """Model flops utilisation at a step time: PaLM's flops (``causal=False``) or MaxText's."""
    seconds = self.step_seconds_overlap if overlap else self.step_seconds
    return (self.flops_causal if causal else self.flops) / (seconds * self.peak_flops)

  def to_json(self) -> dict[str, Any]:
    out = {
      "hbm_argument_bytes": self.argument_bytes,
      "hbm_temp_bytes": self.temp_bytes,
      "hbm_output_bytes": self.output_bytes,
      "hbm_alias_bytes": self.alias_bytes,
      "hbm_code_bytes": self.code_bytes,
      "hbm_total_bytes": self.total_bytes,
      "hbm_capacity_bytes": self.capacity_bytes,
      "fits": self.fits,
      "headroom": self.headroom,
      "compile_seconds": self.compile_seconds,
      "compile_cpu_seconds": self.compile_cpu_seconds,
      "tokens": self.tokens,
    }
    if self.error is not None:
      out.update(requested_bytes=self.requested_bytes, error=self.error)
      return out
    out.update(
      {
        "flops": self.flops,
        "flops_causal": self.flops_causal,
        "hardware_flops": self.hardware_flops,
        "bytes_accessed": self.bytes_accessed,
        "on_chip_bytes": self.on_chip_bytes,
        "wire_bytes": self.wire_bytes,
        "collective_count": self.collective_count,
        "unknown_loops": self.unknown_loops,
        "compute_seconds": self.compute_seconds,
        "hbm_seconds": self.hbm_seconds,
        "comm_seconds": self.comm_seconds,
        "step_seconds": self.step_seconds,
        "step_seconds_overlap": self.step_seconds_overlap,
        "tokens_per_second": self.tokens_per_second,
        "mfu_palm": self.mfu(),
        "mfu_palm_overlap": self.mfu(overlap=True),
        "mfu_maxtext": self.mfu(causal=True),
        "mfu_maxtext_overlap": self.mfu(causal=True, overlap=True),
      }
    )
    return out


def compile_program(
  name: str,
  lower,
  chip: Chip,
  num_chips: int,
  model_flops: float,
  hardware_flops: float,
  *,
  causal_flops: float | None = None,
  unknown_trip_count: int | Sequence[int] = 1,
  coords=None,
  wrap: Sequence[bool] = (),
  hlo_path: str | None = None,
) -> ProgramPlan:
  """Lowers (``lower() -> (lowered, tokens)``) and compiles one program and measures it.

  A compile that runs out of HBM becomes a plan with ``error`` set (`parse_out_of_memory`);
  any other error propagates. ``coords`` are the chip coordinates of the program's devices in
  its device-assignment order and ``wrap`` the slice's wrap-around per dimension (the
  interconnect model, `collective_seconds`). ``hlo_path``: also write the compiled HLO there.
  """
  start, start_cpu = time.perf_counter(), time.process_time()
  lowered, tokens = lower()
  nan = float("nan")
  common = {
    "name": name,
    "tokens": int(tokens),
    "capacity_bytes": chip.hbm_bytes,
    "flops": model_flops / num_chips,
    "flops_causal": (model_flops if causal_flops is None else causal_flops) / num_chips,
    "hardware_flops": hardware_flops / num_chips,
    "peak_flops": chip.peak_flops,
    "hbm_bandwidth": chip.hbm_bandwidth,
  }
  try:
    compiled = lowered.compile()
  except Exception as e:  # XLA raises JaxRuntimeError; only an out-of-memory one is a result
    oom = parse_out_of_memory(str(e))
    if oom is None:
      raise
    return ProgramPlan(
      argument_bytes=0,
      temp_bytes=0,
      output_bytes=0,
      alias_bytes=0,
      code_bytes=0,
      compile_seconds=time.perf_counter() - start,
      compile_cpu_seconds=time.process_time() - start_cpu,
      bytes_accessed=nan,
      on_chip_bytes=nan,
      wire_bytes=nan,
      collective_count=nan,
      comm_seconds=nan,
      unknown_loops=0,
      requested_bytes=oom[0],
      error=str(e).strip().splitlines()[0][:500],
      **common,
    )
  seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
  memory = compiled.memory_analysis()
  text = compiled.as_text()
  if hlo_path is not None:
    with open(hlo_path, "w") as f:
      f.write(text)
  cost = hlo_cost(text, unknown_trip_count=unknown_trip_count)
  return ProgramPlan(
    argument_bytes=int(memory.argument_size_in_bytes),
    temp_bytes=int(memory.temp_size_in_bytes),
    output_bytes=int(memory.output_size_in_bytes),
    alias_bytes=int(memory.alias_size_in_bytes),
    code_bytes=int(memory.generated_code_size_in_bytes),
    compile_seconds=seconds,
    compile_cpu_seconds=cpu_seconds,
    bytes_accessed=cost.bytes_accessed,
    on_chip_bytes=cost.on_chip_bytes,
    wire_bytes=cost.wire_bytes,
    collective_count=sum(c.count for c in cost.collectives),
    comm_seconds=sum(collective_seconds(c, chip, coords, wrap) for c in cost.collectives),
    unknown_loops=cost.unknown_loops,
    **common,
  )


def device_coords(devices) -> list[tuple[int, ...]] | None:
  """Chip coordinates of ``devices`` (TPU devices carry ``coords``); None when any lacks them."""
  coords = [getattr(d, "coords", None) for d in devices]
  return None if any(c is None for c in coords) else [tuple(c) for c in coords]


def plan(
  experiment,
  config,
  devices,
  chip: Chip,
  *,
  programs: Sequence[str] = PROGRAMS,
  log=None,
  wrap: Sequence[bool] = (),
  hlo_dir: str | None = None,
) -> list[ProgramPlan]:
  """Compiles ``programs`` of ``experiment`` with architecture ``config`` for ``devices``.

  A program that does not fit is a plan with ``error`` set; the others are still compiled.
  ``hlo_dir``: write each compiled module there as ``<program>.hlo.txt``.
  """
  from ssapo_jax import sharding as shd  # pylint: disable=import-outside-toplevel
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel

  mesh = shd.make_mesh(experiment.mesh, devices)
  coords = device_coords(list(mesh.devices.flat))
  t, s, d = experiment.train, experiment.sampling, experiment.data
  # Sequences per scoring call: packed, a call holds 2 x its batch size (`Scorer`).
  score_seqs = tr.scoring_batch_size(t, mesh) * (2 if d.packing else 1)
  atoms = experiment.dro.num_pieces if t.objective == "robust" else 1
  score = lambda causal: forward_flops(
    config, score_seqs * d.max_length, d.max_length, causal=causal
  )
  sample = lambda causal: (
    s.refill_batches
    * generate_flops(
      config, s.batch_size * s.num_samples, d.max_prompt_length, s.max_new_tokens, causal=causal
    )
  )
  from ssapo_jax.sampling import Sampler  # pylint: disable=import-outside-toplevel

  # Packed (data.packing), the step is compiled on its largest shape: the top of the row ladder
  # of pack_length-token rows (2 x global_batch_size rows, one sequence each, at most); the
  # flops count max_length tokens per sequence either way.
  packed_rows = packed_train_rows(t, mesh) if d.packing else None
  train_len = d.resolved_pack_length if d.packing else d.max_length
  builders = {  # name: (lower, model flops PaLM / MaxText, hardware flops, unbounded-loop trips)
    "train_step": (
      lambda: lower_train_step(
        t, config, mesh, seq_len=train_len, num_atoms=atoms, packed_rows=packed_rows
      ),
      train_step_flops(config, t, d.max_length),
      train_step_flops(config, t, d.max_length, causal=True),
      train_step_hardware_flops(config, t, d.max_length),
      1,
    ),
    "score_logps": (
      lambda: lower_score_logps(experiment, config, mesh),
      score(False),
      score(True),
      score(False),
      1,
    ),
    "generate": (
      lambda: lower_generate(s, config, mesh, prompt_len=d.max_prompt_length),
      sample(False),
      sample(True),
      sample(False),
      Sampler.loop_trips(s, d.max_prompt_length),
    ),
  }
  out = []
  for name in programs:
    if log is not None:
      log(f"compiling {name} ...")
    lower, flops, causal, hardware, trips = builders[name]
    p = compile_program(
      name,
      lower,
      chip,
      len(devices),
      flops,
      hardware,
      causal_flops=causal,
      unknown_trip_count=trips,
      coords=coords,
      wrap=wrap,
      hlo_path=(None if hlo_dir is None else os.path.join(hlo_dir, f"{name}.hlo.txt")),
    )
    out.append(p)
    if log is None:
      continue
    if p.error is not None:
      log(f"{name}: does NOT fit: XLA needs {p.requested_bytes / GiB:.2f} GiB per chip ({p.error})")
    else:
      log(
        f"{name}: {p.total_bytes / GiB:.2f} GiB of {p.capacity_bytes / GiB:.1f} GiB per chip "
        f"({'fits' if p.fits else 'does NOT fit'}), compiled in {p.compile_seconds:.0f} s, "
        f"step {1e3 * p.step_seconds_overlap:.0f}-{1e3 * p.step_seconds:.0f} ms"
      )
  return out


# ---------------------------------------------------------------------------------------------
# Whole phases and the whole run.
# ---------------------------------------------------------------------------------------------


def num_params(config) -> int:
  """All parameters of the model (embeddings, norms and LM head included), from its shapes."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  return int(sum(x.size for x in jax.tree.leaves(nnx.state(_abstract_model(config), nnx.Param))))


@dataclasses.dataclass(frozen=True)
class PhaseFit:
  """One phase of a round: its program's bytes plus what the run holds beside it, per chip."""

  round_index: int
  phase: str
  program: str
  program_bytes: int
  held_bytes: float  # on the chip beside the program (`pipeline.residency`)
  host_bytes: float  # offloaded to host memory meanwhile
  capacity_bytes: int
  held: tuple[str, ...]  # what is held, "name (GiB, where)"

  @property
  def resident_bytes(self) -> float:
    return self.program_bytes + self.held_bytes

  @property
  def fits(self) -> bool:
    return self.resident_bytes <= self.capacity_bytes

  @property
  def headroom(self) -> float:
    return 1.0 - self.resident_bytes / self.capacity_bytes


def phase_fits(
  experiment, plans: Sequence[ProgramPlan], *, num_params: int, shards: int
) -> list[PhaseFit]:
  """Each phase of the seed round and of a later round whose program was planned."""
  from ssapo_jax.pipeline import residency  # pylint: disable=import-outside-toplevel

  by_name = {p.name: p for p in plans}
  out = []
  for t in (0, 1):
    for ph in residency.phases(experiment, num_params=num_params, shards=shards, round_index=t):
      p = by_name.get(ph.program)
      if p is None:
        continue
      out.append(
        PhaseFit(
          t,
          ph.name,
          ph.program,
          p.total_bytes,
          ph.hbm_bytes,
          ph.host_bytes,
          p.capacity_bytes,
          tuple(f"{h.name} {h.bytes / GiB:.2f} GiB {h.where}" for h in ph.held),
        )
      )
  return out


def _count(size: float, what: str) -> int:
  if isinstance(size, float) and size < 1:
    raise ValueError(f"--run needs {what} as a count of rows; it is the fraction {size}")
  return int(size)


@dataclasses.dataclass(frozen=True)
class RunPhase:
  """One phase of the whole run: how many calls of which program, and their time."""

  round_index: int
  phase: str
  program: str
  calls: int
  seconds_overlap: float  # calls x the program's step time with perfect overlap
  seconds: float  # ... with no overlap of collectives
  note: str


def run_estimate(
  experiment, plans: Sequence[ProgramPlan], mesh_batch_shards: int
) -> tuple[list[RunPhase], dict[str, Any]]:
  """Every phase of the configured run as calls of the planned programs.

  Round 0 scores the seed with the SFT reference and trains ``seed_epochs`` epochs; round t
  samples ``pool_sizes[t-1]`` prompts (``sampling.batch_size`` per call, ``num_samples`` x
  ``max_new_tokens`` each), scores every sample under the policy and the judge, scores each
  pair's two responses under the train reference, and trains ``round_epochs`` epochs (one pair
  per prompt at most). Calls run at the planned shapes (the longest bucket), so the times bound
  a run whose samples stop at EOS from above. Also returns the compiled shapes the run needs:
  one per length bucket of ``data.bucket_size`` for each program (sampling buckets the prompt,
  scoring and training the whole sequence) or, with ``data.packing``, one per row count of the
  packed ladder (`batch.row_buckets`) for scoring and training, and the compile CPU seconds of
  each as planned.
  """
  by_name = {p.name: p for p in plans}
  missing = sorted({"train_step", "score_logps", "generate"} - set(by_name))
  if missing:
    raise ValueError(f"--run needs all three programs planned; missing {', '.join(missing)}")
  bad = [p.name for p in plans if p.error is not None]
  if bad:
    raise ValueError(f"--run: {', '.join(bad)} does not fit, so the run cannot be timed")
  d, s, r = experiment.data, experiment.sampling, experiment.rounds
  rows = max(experiment.train.micro_batch_size, mesh_batch_shards)  # `scoring_batch_size`
  score_seqs = rows * (2 if d.packing else 1)  # sequences per scoring call (`Scorer`)
  out = []

  def add(t, phase, program, calls, note):
    p = by_name[program]
    out.append(
      RunPhase(
        t, phase, program, calls, calls * p.step_seconds_overlap, calls * p.step_seconds, note
      )
    )

  seed = _count(d.seed_size, "data.seed_size")
  for t in range(r.num_rounds + 1):
    epochs = experiment.train_for_round(t).epochs
    if t == 0:
      pairs = seed
    else:
      prompts = _count(d.pool_sizes[t - 1], f"data.pool_sizes[{t - 1}]")
      pairs = prompts
      add(
        t,
        "sampling",
        "generate",
        math.ceil(prompts / (s.batch_size * s.refill_batches)),
        f"{prompts} prompts x {s.num_samples} samples x {s.max_new_tokens} tokens",
      )
      seqs = prompts * s.num_samples
      add(
        t,
        "scoring",
        "score_logps",
        2 * math.ceil(seqs / score_seqs),
        f"{seqs} samples under the policy and the judge",
      )
    add(
      t,
      "follower",
      "score_logps",
      math.ceil(2 * pairs / score_seqs),
      f"reference log-probs of {pairs} pairs (at most one per prompt)",
    )
    steps = math.ceil(pairs / experiment.train.global_batch_size) * epochs
    add(t, "training", "train_step", steps, f"{epochs} epoch(s) of {pairs} pairs")
    if r.num_eval_prompts and t >= 0:
      add(
        t,
        "evaluate",
        "generate",
        math.ceil(r.num_eval_prompts / (s.batch_size * s.refill_batches)),
        f"{r.num_eval_prompts} greedy held-out prompts",
      )
  from ssapo_jax.batch import row_buckets  # pylint: disable=import-outside-toplevel

  buckets = lambda length: math.ceil(length / d.bucket_size)
  t_cfg = experiment.train
  if d.packing:  # one row length; the row counts of the ladder (`row_buckets`)
    m = t_cfg.micro_batches
    multiple = mesh_batch_shards // math.gcd(mesh_batch_shards, m)  # `packed_row_multiple`
    train_shapes = len(row_buckets(t_cfg.global_batch_size // m, multiple))
    score_shapes = len(row_buckets(rows, mesh_batch_shards))
  else:
    train_shapes = score_shapes = buckets(d.max_length)
  # Compile time per shape: the plan's CPU seconds (its wall time here depends on the load).
  shapes = {  # program: (distinct shapes, compile seconds per shape as planned)
    "generate": (buckets(d.max_prompt_length), by_name["generate"].compile_cpu_seconds),
    "score_logps": (score_shapes, by_name["score_logps"].compile_cpu_seconds),
    # A train step per shape, and per round (each round has its own schedule).
    "train_step": (
      train_shapes * (r.num_rounds + 1),
      by_name["train_step"].compile_cpu_seconds,
    ),
  }
  compile_seconds = sum(n * sec for n, sec in shapes.values())
  return out, {
    "shapes": {k: {"count": n, "compile_seconds_each": sec} for k, (n, sec) in shapes.items()},
    "compile_seconds": compile_seconds,
  }


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  rows = [tuple(head)] + [tuple(r) for r in rows]
  widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
  lines = [
    "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    for r in rows
  ]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def format_table(plans: Sequence[ProgramPlan]) -> str:
  """A fixed-width table of the plans, one row per program. Step times and MFU are given as
  ``perfect overlap - no overlap`` of the collectives."""
  head = (
    "program",
    "args GiB",
    "temp GiB",
    "total GiB",
    "cap GiB",
    "fits",
    "free",
    "compile s",
    "cpu s",
    "TFLOP/chip",
    "HW TFLOP",
    "HBM GB/chip",
    "ICI GB/chip",
    "compute ms",
    "HBM ms",
    "comm ms",
    "step ms",
    "tokens/s",
    "MFU PaLM",
    "MFU MaxText",
  )
  rows = []
  for p in plans:
    if p.error is not None:
      rows.append(
        (
          p.name,
          "-",
          "-",
          f">={p.total_bytes / GiB:.2f}",
          f"{p.capacity_bytes / GiB:.1f}",
          "NO",
          "-",
          f"{p.compile_seconds:.0f}",
          f"{p.compile_cpu_seconds:.0f}",
        )
        + ("-",) * 11
      )
      continue
    pct = lambda x: f"{100 * x:.0f}%"
    rows.append(
      (
        p.name,
        f"{p.argument_bytes / GiB:.2f}",
        f"{p.temp_bytes / GiB:.2f}",
        f"{p.total_bytes / GiB:.2f}",
        f"{p.capacity_bytes / GiB:.1f}",
        "yes" if p.fits else "NO",
        pct(p.headroom),
        f"{p.compile_seconds:.0f}",
        f"{p.compile_cpu_seconds:.0f}",
        f"{p.flops / 1e12:.2f}",
        f"{p.hardware_flops / 1e12:.2f}",
        f"{p.bytes_accessed / 1e9:.1f}",
        f"{p.wire_bytes / 1e9:.1f}",
        f"{1e3 * p.compute_seconds:.0f}",
        f"{1e3 * p.hbm_seconds:.0f}",
        f"{1e3 * p.comm_seconds:.0f}",
        f"{1e3 * p.step_seconds_overlap:.0f}-{1e3 * p.step_seconds:.0f}",
        f"{p.tokens_per_second:,.0f}",
        f"{pct(p.mfu(overlap=True))}-{pct(p.mfu())}",
        f"{pct(p.mfu(causal=True, overlap=True))}-{pct(p.mfu(causal=True))}",
      )
    )
  return _table(head, rows)


def format_phases(fits: Sequence[PhaseFit]) -> str:
  head = (
    "round",
    "phase",
    "program",
    "program GiB",
    "held GiB",
    "resident GiB",
    "cap GiB",
    "fits",
    "free",
    "held beside the program",
  )
  return _table(
    head,
    [
      (
        "seed" if f.round_index == 0 else "t>=1",
        f.phase,
        f.program,
        f"{f.program_bytes / GiB:.2f}",
        f"{f.held_bytes / GiB:.2f}",
        f"{f.resident_bytes / GiB:.2f}",
        f"{f.capacity_bytes / GiB:.1f}",
        "yes" if f.fits else "NO",
        f"{100 * f.headroom:.0f}%",
        "; ".join(f.held) or "-",
      )
      for f in fits
    ],
  )


def format_run(phases: Sequence[RunPhase], shapes: dict[str, Any]) -> str:
  rows = [
    (
      str(p.round_index),
      p.phase,
      p.program,
      f"{p.calls:,}",
      f"{p.seconds_overlap / 3600:.2f}-{p.seconds / 3600:.2f}",
      p.note,
    )
    for p in phases
  ]
  lo, hi = sum(p.seconds_overlap for p in phases), sum(p.seconds for p in phases)
  compile_h = shapes["compile_seconds"] / 3600
  rows.append(
    (
      "",
      "compile",
      "",
      str(sum(v["count"] for v in shapes["shapes"].values())),
      f"{compile_h:.2f}",
      "distinct shapes x compile CPU seconds per shape, as planned",
    )
  )
  rows.append(
    (
      "",
      "total",
      "",
      "",
      f"{lo / 3600 + compile_h:.1f}-{hi / 3600 + compile_h:.1f}",
      "hours, perfect overlap - no overlap of collectives",
    )
  )
  return _table(("round", "phase", "program", "calls", "hours", "what"), rows)


def expected_batch_padding(experiment, path: str, mesh) -> dict:
  """`batch.expected_padding` of the run's train batches (global batch, micro-batches,
  ``data.bucket_size``, the packed row length and row multiple of ``mesh``) for the length
  histogram JSON at ``path``, with ``"num_sequences"`` and ``"packing"`` (the configured
  mode) added."""
  from ssapo_jax import train as tr  # pylint: disable=import-outside-toplevel
  from ssapo_jax.batch import expected_padding  # pylint: disable=import-outside-toplevel

  with open(path) as f:
    histogram = json.load(f)
  t, d = experiment.train, experiment.data
  out = expected_padding(
    histogram,
    global_batch_size=t.global_batch_size,
    micro_batches=t.micro_batches,
    bucket_size=d.bucket_size,
    pack_length=d.resolved_pack_length,
    row_multiple=tr.packed_row_multiple(mesh, t),
  )
  return {**out, "num_sequences": histogram.get("num_sequences"), "packing": d.packing}


def format_padding(experiment, padding: dict) -> str:
  """The expected padding lines of `expected_batch_padding`."""
  d, g = experiment.data, experiment.train.global_batch_size
  padded = ", ".join(f"{g}x{t}" for t in padding["padded_lengths"])
  packed = ", ".join(f"{r}x{d.resolved_pack_length}" for r in padding["packed_rows"])
  mode = "packed" if padding["packing"] else "padded"
  return "\n".join(
    [
      f"expected padding ({padding['num_sequences']} sequences in the length histogram; "
      f"data.packing={str(padding['packing']).lower()}, this run {mode}):",
      f"  padded: {padding['padded']:.1%} of the train step's tokens; shapes drawn: {padded}",
      f"  packed: {padding['packed']:.1%}; shapes drawn: {packed}",
    ]
  )


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="ssapo-plan",
    description="Compile a config's train step, scoring pass and sampler for a TPU slice "
    "ahead of time (no TPU, no weights) and report HBM, flops, collectives, "
    "step times, each phase's resident memory and (--run) the whole run's time.",
  )
  p.add_argument("config", help="experiment YAML")
  p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batches=2")
  p.add_argument("--topology", required=True, help=f"Cloud TPU slice: {', '.join(SLICES)}")
  p.add_argument(
    "--arch",
    default=None,
    help="architecture preset (mistral-7b, llama3-8b, llama3.2-3b, llama3.2-1b) when model.path "
    "holds no config.json",
  )
  p.add_argument(
    "--num-layers",
    type=int,
    default=None,
    help="plan a model truncated to this many decoder layers (quick checks)",
  )
  p.add_argument(
    "--programs", default=",".join(PROGRAMS), help=f"comma-separated subset of {','.join(PROGRAMS)}"
  )
  p.add_argument(
    "--run",
    action="store_true",
    help="also estimate the whole configured run (all three programs needed)",
  )
  p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
  p.add_argument(
    "--lengths",
    default=None,
    help="length histogram JSON of the configured data (ssapo-train --check "
    "--length-histogram PATH writes it): report the expected padding fraction, padded and "
    "packed, and the train-step shapes a run compiles",
  )
  p.add_argument(
    "--hlo-dir", default=None, help="also write each compiled program's HLO text to this directory"
  )
  return p.parse_args(argv)


def main(argv=None) -> int:
  """Entry point of ``ssapo-plan``; exit status 1 when a program or a phase does not fit, 2 on
  bad input."""
  args = parse_args(argv)
  programs = [name for name in args.programs.split(",") if name]
  try:
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
      raise ValueError(f"--programs: unknown {unknown}; choose from {', '.join(PROGRAMS)}")
    if args.run and set(programs) != set(PROGRAMS):
      raise ValueError("--run needs all three programs; leave out --programs")
    slice_ = tpu_slice(args.topology)
    experiment = load_experiment(args.config, args.overrides)
    config = model_config(experiment, arch=args.arch, num_layers=args.num_layers)
    devices = topology_devices(slice_)
  except (ValueError, RuntimeError) as e:
    print(f"ssapo-plan: {e}", file=sys.stderr)
    return 2
  from ssapo_jax import sharding as shd  # pylint: disable=import-outside-toplevel

  chip = CHIPS[slice_.chip]
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  log(
    f"{slice_.name}: {slice_.num_chips} x {chip.name} ({slice_.topology}); "
    f"{config.model_type} {config.num_layers} layers, {config.matmul_params() / 1e9:.2f}B "
    "matmul parameters"
  )
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
  plans = plan(
    experiment,
    config,
    devices,
    chip,
    programs=programs,
    log=log,
    wrap=slice_.wrap,
    hlo_dir=args.hlo_dir,
  )
  print(format_table(plans))
  padding = None
  if args.lengths:
    padding = expected_batch_padding(
      experiment, args.lengths, shd.make_mesh(experiment.mesh, devices)
    )
    print()
    print(format_padding(experiment, padding))
  mesh_shape = dict(zip(shd.MESH_AXES, shd.resolve_mesh_shape(experiment.mesh, len(devices))))
  params = num_params(config)
  fits = phase_fits(
    experiment, plans, num_params=params, shards=mesh_shape["fsdp"] * mesh_shape["tensor"]
  )
  print()
  print(format_phases(fits))
  run = None
  if args.run:
    try:
      run = run_estimate(experiment, plans, mesh_shape["data"] * mesh_shape["fsdp"])
    except ValueError as e:
      print(f"ssapo-plan: {e}", file=sys.stderr)
    else:
      print()
      print(format_run(*run))
  if args.json:
    report = {
      "config": args.config,
      "overrides": list(args.overrides),
      "topology": slice_.name,
      "libtpu_topology": slice_.topology,
      "chip": chip.name,
      "num_chips": slice_.num_chips,
      "mesh": mesh_shape,
      "model_type": config.model_type,
      "num_layers": config.num_layers,
      "matmul_params": config.matmul_params(),
      "num_params": params,
      "peak_flops": chip.peak_flops,
      "hbm_bandwidth": chip.hbm_bandwidth,
      "link_bandwidth": chip.link_bandwidth,
      "links": chip.links,
      "programs": {p.name: p.to_json() for p in plans},
      "phases": [
        dict(
          dataclasses.asdict(f), resident_bytes=f.resident_bytes, fits=f.fits, headroom=f.headroom
        )
        for f in fits
      ],
    }
    if padding is not None:
      report["padding"] = padding
    if run is not None:
      report["run"] = {
        "phases": [dataclasses.asdict(p) for p in run[0]],
        **run[1],
        "hours_overlap": sum(p.seconds_overlap for p in run[0]) / 3600,
        "hours": sum(p.seconds for p in run[0]) / 3600,
      }
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  too_big = [p for p in plans if not p.fits]
  for p in too_big:
    print(
      f"ssapo-plan: {p.name} does not fit {slice_.name}: needs {p.total_bytes / GiB:.1f} GiB "
      f"of HBM per chip, the chip has {p.capacity_bytes / GiB:.1f} GiB",
      file=sys.stderr,
    )
  phases_too_big = [f for f in fits if not f.fits and f.program not in {p.name for p in too_big}]
  for f in phases_too_big:
    print(
      f"ssapo-plan: the {f.phase} phase does not fit {slice_.name}: its program and what the "
      f"run holds beside it need {f.resident_bytes / GiB:.1f} GiB per chip, the chip has "
      f"{f.capacity_bytes / GiB:.1f} GiB",
      file=sys.stderr,
    )
  return 1 if too_big or phases_too_big else 0


if __name__ == "__main__":
  sys.exit(main())
