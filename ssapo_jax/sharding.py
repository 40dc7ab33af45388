"""Device mesh, logical-axis partition rules, and host-local <-> global arrays.

One mesh with three named axes serves every parallelism this project uses:

* ``data``   -- pure data parallelism (parameters replicated across it),
* ``fsdp``   -- data parallelism whose members also shard parameters and optimizer state
  (ZeRO-3 / fully sharded data parallel),
* ``tensor`` -- tensor (model) parallelism over heads, MLP and vocabulary dimensions.

Model code names parameter axes logically (``"embed"``, ``"mlp"``, ...); `LOGICAL_AXIS_RULES`
is the single table that maps those names to mesh axes (in the spirit of MaxText's
``logical_axis_rules``). Batches are sharded along their leading dimension over
``("data", "fsdp")``.

Multi-host: `initialize_distributed` starts ``jax.distributed`` when more than one process
takes part; each process then loads only the rows of every global batch that its devices
hold (`host_batch_rows`) and `global_batch` assembles global arrays with
``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ssapo_jax.fielddocs import document_fields

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
# Each logical name appears exactly once; there are no order-dependent fallbacks. A mesh
# axis whose size does not divide the dimension is dropped for that dimension (see
# `logical_to_spec`), so tiny test models still shard where they can.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  # Activations / data.
  ("batch", BATCH_AXES),
  # Parameters.
  ("vocab", "tensor"),  # embedding rows and LM-head columns
  ("embed", "fsdp"),  # model width D: the FSDP axis of every weight matrix
  ("q_heads", "tensor"),  # N query heads
  ("kv_heads", "tensor"),  # K key/value heads
  ("mlp", "tensor"),  # F MLP hidden
  ("head_dim", None),  # H per-head width
  ("norm", None),  # RMSNorm scales (tiny)
  ("layers", None),  # stacked-layer axis when layers are scanned
)

# Parameter layout for autoregressive decoding: the training rules without FSDP, so every
# device holds its tensor-parallel slice of every weight for the whole sampling loop instead
# of all-gathering the FSDP shards at every generated token.
DECODE_AXIS_RULES = tuple(
  (name, None if name == "embed" else axes) for name, axes in LOGICAL_AXIS_RULES
)


@document_fields
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Shape of the device mesh and the multi-host set-up.

  The product ``data * fsdp * tensor`` must equal the number of devices; one axis may be
  ``-1`` meaning "all remaining devices".
  """

  data: int = 1  # pure data-parallel ways; -1 = the rest
  # fully-sharded data-parallel ways (shards params + optimizer state); -1 = the rest
  fsdp: int = -1
  tensor: int = 1  # tensor-parallel ways (heads / MLP / vocab); -1 = the rest
  # "host:port" of process 0; None = single process or TPU auto-detect
  coordinator_address: str | None = None
  num_processes: int | None = None  # total processes (hosts); None = auto-detect / single process
  process_id: int | None = None  # this process's index in [0, num_processes); None = auto-detect
  local_device_ids: tuple[int, ...] | None = None  # devices this process uses; None = all visible
  # Seconds without a heartbeat after which jax.distributed declares a process dead; every other
  # process then exits non-zero (a killed peer never leaves the rest hanging).
  coordination_timeout_seconds: int = 100

  def __post_init__(self):
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    for name, size in sizes.items():
      if not isinstance(size, int) or (size < 1 and size != -1):
        raise ValueError(f"mesh.{name} must be a positive int or -1 (the rest), got {size!r}")
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
      raise ValueError(f"at most one mesh axis may be -1 (the rest), got -1 for {rest}")
    if self.num_processes is not None and self.num_processes < 1:
      raise ValueError(f"mesh.num_processes must be >= 1, got {self.num_processes}")
    if self.process_id is not None:
      if self.num_processes is None:
        raise ValueError("mesh.process_id is set but mesh.num_processes is not")
      if not 0 <= self.process_id < self.num_processes:
        raise ValueError(
          f"mesh.process_id must be in [0, {self.num_processes}), got {self.process_id}"
        )
    if self.coordination_timeout_seconds < 1:
      raise ValueError(
        f"mesh.coordination_timeout_seconds must be >= 1, got {self.coordination_timeout_seconds}"
      )
    if (self.num_processes or 1) > 1 and self.coordinator_address is None:
      raise ValueError(
        f"mesh.num_processes={self.num_processes} needs mesh.coordinator_address "
        "(host:port of process 0); leave both unset on TPU pods to auto-detect"
      )

  @property
  def shape(self) -> tuple[int, int, int]:
    """The configured sizes in `MESH_AXES` order (may contain -1)."""
    return (self.data, self.fsdp, self.tensor)


def resolve_mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  """Replaces the ``-1`` axis by the remaining devices and checks the product.

  Raises:
    ValueError: if the sizes do not multiply to ``num_devices``.
  """
  shape = list(config.shape)
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(
        f"mesh {dict(zip(MESH_AXES, config.shape))}: the fixed axes multiply to {known}, "
        f"which does not divide the {num_devices} devices"
      )
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, shape))} has {math.prod(shape)} devices but "
      f"{num_devices} are available; make data*fsdp*tensor = {num_devices} or set one axis to -1"
    )
  return tuple(shape)


def _tpu_pod_detected() -> bool:
  """True on a multi-host Cloud TPU slice, where ``jax.distributed`` can auto-detect peers."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return (
    len([h for h in hosts.split(",") if h]) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
  )


def initialize_distributed(config: MeshConfig) -> bool:
  """Starts ``jax.distributed`` when more than one process takes part.

  Explicit ``coordinator_address``/``num_processes``/``process_id`` are used when given (GPU
  nodes, localhost tests); on a multi-host TPU slice the peers are auto-detected. A single
  process does nothing. Must run before any other JAX call touches the devices. Idempotent.

  ``config.coordination_timeout_seconds`` is the heartbeat timeout: when a process dies (or
  hangs) the coordination service notices within that time and every other process aborts
  with a non-zero status, so a relaunch of all processes can resume from the checkpoints.

  Returns:
    True if ``jax.distributed`` is (now) initialised.
  """
  if jax.distributed.is_initialized():
    return True
  if config.num_processes is not None and config.num_processes > 1:
    # CPU processes (tests, CPU clusters) need a cross-process collectives backend; this
    # setting touches only the CPU client.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=config.coordinator_address,
      num_processes=config.num_processes,
      process_id=config.process_id,
      local_device_ids=list(config.local_device_ids) if config.local_device_ids else None,
      heartbeat_timeout_seconds=config.coordination_timeout_seconds,
    )
    return True
  if config.num_processes is None and _tpu_pod_detected():
    jax.distributed.initialize(heartbeat_timeout_seconds=config.coordination_timeout_seconds)
    return True
  return False


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh over all (global) devices.

  Uses ``jax.make_mesh`` so that on TPU the device order follows the physical topology.
  Axis types are ``Auto`` (GSPMD propagation with explicit in/out shardings).

  Raises:
    ValueError: if the configured sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(config, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def _rules_dict(rules) -> dict[str, Any]:
  table: dict[str, Any] = {}
  for name, axes in rules:
    if name in table:
      raise ValueError(f"logical axis {name!r} appears twice in the partition rules")
    table[name] = axes
  return table


def logical_to_spec(
  logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, *, rules=LOGICAL_AXIS_RULES
) -> PartitionSpec:
  """Maps one array's logical axis names to a `PartitionSpec` for ``mesh``.

  A mesh axis is kept for a dimension only if it divides that dimension (after any mesh
  axes already kept for it) and was not used by an earlier dimension; otherwise it is
  dropped and the dimension is replicated over it. Mesh axes of size 1 are dropped.

  Args:
    logical_axes: one name (or None) per array dimension.
    shape: the array's shape.
    mesh: the mesh (only axis names and sizes are read).
    rules: ``(logical_name, mesh_axes)`` pairs; defaults to `LOGICAL_AXIS_RULES`.

  Raises:
    ValueError: on a rank mismatch or a logical name missing from ``rules``.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_axes)} do not match array shape {tuple(shape)}")
  table = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no partition rule; known: {sorted(table)}")
    axes = table[name]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    kept, ways = [], 1
    for axis in axes:
      size = mesh.shape[axis]
      if size == 1 or axis in used or dim % (ways * size):
        continue
      kept.append(axis)
      ways *= size
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return PartitionSpec(*spec)


def _is_axes_leaf(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def logical_shardings(tree: Any, logical_axes: Any, mesh: Mesh, *, rules=LOGICAL_AXIS_RULES) -> Any:
  """`NamedSharding` for every array in ``tree`` from a matching pytree of logical-axis tuples.

  ``logical_axes`` must have ``tree``'s structure with a tuple of names at each array
  (e.g. ``ssapo_jax.models.logical_axes(params)``). ``tree`` may hold arrays or
  ``jax.ShapeDtypeStruct``s.
  """
  axes_leaves = jax.tree.leaves(logical_axes, is_leaf=_is_axes_leaf)
  leaves, treedef = jax.tree.flatten(tree)
  if len(axes_leaves) != len(leaves):
    raise ValueError(
      f"logical axes tree has {len(axes_leaves)} entries but the array tree has "
      f"{len(leaves)} arrays"
    )
  out = [
    NamedSharding(mesh, logical_to_spec(ax, x.shape, mesh, rules=rules))
    for x, ax in zip(leaves, axes_leaves)
  ]
  return jax.tree.unflatten(treedef, out)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_spec(ndim: int, batch_size: int, mesh: Mesh) -> PartitionSpec:
  """Spec of a batch-leading array: dimension 0 over ``("data", "fsdp")``, the rest replicated."""
  return logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1), mesh)


def num_batch_shards(mesh: Mesh) -> int:
  """How many ways the batch dimension is split (``data * fsdp``)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(batch_size: int, mesh: Mesh, *, what: str = "global batch size") -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over ``data * fsdp``."""
  ways = num_batch_shards(mesh)
  if batch_size % ways:
    raise ValueError(
      f"{what} {batch_size} is not divisible by data*fsdp = {ways} (mesh {dict(mesh.shape)})"
    )


def host_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
  """The rows of a global batch that this process must load.

  Computed from the batch sharding: the union of the rows held by this process's devices.
  With one process it is ``slice(0, global_batch_size)``.

  Raises:
    ValueError: if the batch does not divide over the mesh, or this process's rows are not
      one contiguous block (a device order this module does not produce).
  """
  check_batch_divisible(global_batch_size, mesh)
  sharding = NamedSharding(mesh, batch_spec(1, global_batch_size, mesh))
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if hi - lo != len(rows):
    raise ValueError(
      f"process {jax.process_index()} holds non-contiguous batch rows {sorted(rows)}"
    )
  return slice(lo, hi)


def global_batch(mesh: Mesh, host_local_batch: Any) -> Any:
  """Builds global, batch-sharded `jax.Array`s from this process's numpy rows.

  Args:
    mesh: the mesh.
    host_local_batch: a pytree (e.g. `PreferenceBatch`) of numpy arrays holding this
      process's rows (`host_batch_rows`) of every field; leading dimension = rows per host.

  Returns:
    The same pytree of global arrays, leading dimension ``rows per host * num_processes``,
    sharded over ``("data", "fsdp")``.
  """
  nproc = jax.process_count()

  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * nproc,) + x.shape[1:]
    check_batch_divisible(global_shape[0], mesh, what="global batch rows")
    sharding = NamedSharding(mesh, batch_spec(x.ndim, global_shape[0], mesh))
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(to_global, host_local_batch)


def host_local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded on dimension 0 only, as numpy (the inverse
  of `global_batch`).

  Reads only the addressable shards (replicas over other axes are read once), so it works for
  arrays spanning several processes.

  Raises:
    ValueError: if this process's rows are not one contiguous block.
  """
  blocks: dict[int, np.ndarray] = {}
  for shard in x.addressable_shards:
    start, stop, _ = shard.index[0].indices(x.shape[0]) if x.ndim else (0, 1, 1)
    if start not in blocks:
      blocks[start] = np.asarray(shard.data)
  starts = sorted(blocks)
  for a, b in zip(starts, starts[1:]):
    if a + blocks[a].shape[0] != b:
      raise ValueError(
        f"process {jax.process_index()} holds non-contiguous rows of a "
        f"{x.shape} array (blocks at {starts})"
      )
  return np.concatenate([blocks[s] for s in starts])


def to_host(tree: Any) -> Any:
  """Every array of ``tree`` as numpy on every host, whole: THE way to read device values.

  Correct for any sharding and any number of processes: an array this process can read alone
  (fully addressable, or fully replicated) is copied from its local devices; one that spans
  processes with parts held elsewhere (e.g. FSDP-sharded parameters on a pod) is all-gathered
  with ``process_allgather``. Whether a collective runs depends only on the arrays' shardings,
  which are the same on every process, so every process must make the same call (as for any
  other step of the program). Non-array leaves (Python scalars, numpy) pass through as numpy.
  Use `host_local_rows` instead where only this process's rows are wanted.

  Args:
    tree: a pytree of `jax.Array`s / numpy arrays / scalars.

  Returns:
    The same pytree of numpy arrays (shape and dtype unchanged).
  """

  def read(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(read, tree)


def _is_global(x: Any) -> bool:
  """An array some of whose shards live in another process (it cannot be read locally)."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """Places a value onto a (possibly multi-host) sharding.

  ``x`` is either a value every process holds in full (numpy, a scalar, a process-local
  `jax.Array`): each process then copies only the slices its own devices need (``jax.device_put``
  of a process-local array cannot target remote devices); or an already global `jax.Array`
  (e.g. parameters sharded across processes): it is resharded on the devices, never fetched
  to a host, and returned as is when it already has ``sharding``.
  """
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = put_global(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  if _is_global(x):
    return _reshard((x,), (sharding,))[0]
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _identity(*xs):
  return xs


def _reshard(arrays: tuple, shardings: tuple) -> tuple:
  """Global arrays moved onto ``shardings`` by one jitted identity (a device-side collective
  where layouts differ; an array that already has its sharding is returned unchanged)."""
  todo = [
    i
    for i, (x, s) in enumerate(zip(arrays, shardings))
    if not x.sharding.is_equivalent_to(s, x.ndim)
  ]
  if not todo:
    return arrays
  moved = jax.jit(_identity, out_shardings=tuple(shardings[i] for i in todo))(
    *(arrays[i] for i in todo)
  )
  out = list(arrays)
  for i, y in zip(todo, moved):
    out[i] = y
  return tuple(out)


def shard_params(params: Any, shardings: Any) -> Any:
  """Places a parameter pytree onto its shardings (`put_global` for every leaf).

  Leaves may be host values every process holds in full, or global arrays already sharded
  (across processes too): those are resharded on the devices, all in one jitted call.
  """
  leaves, treedef = jax.tree.flatten(params)
  targets = treedef.flatten_up_to(shardings)
  out = [None if _is_global(x) else put_global(x, s) for x, s in zip(leaves, targets)]
  glob = [i for i, x in enumerate(leaves) if _is_global(x)]
  if glob:
    moved = _reshard(tuple(leaves[i] for i in glob), tuple(targets[i] for i in glob))
    for i, y in zip(glob, moved):
      out[i] = y
  return jax.tree.unflatten(treedef, out)


def replicated_fraction(params: Any, shardings: Any) -> float:
  """Fraction of parameter elements stored fully replicated under ``shardings``."""
  leaves = jax.tree.leaves(params)
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  total = sum(int(np.prod(x.shape)) for x in leaves)
  repl = sum(int(np.prod(x.shape)) for x, s in zip(leaves, specs) if s.is_fully_replicated)
  return repl / max(total, 1)


def assert_params_sufficiently_sharded(
  params: Any, shardings: Any, *, max_replicated: float = 0.02, min_size: int = 0
) -> None:
  """Fails when too much of the model is stored replicated (MaxText's guard of the same name).

  Args:
    params: parameter pytree (arrays or ``ShapeDtypeStruct``s).
    shardings: matching pytree of `NamedSharding`.
    max_replicated: largest allowed fraction of elements (among tensors with at least
      ``min_size`` elements) that are fully replicated.
    min_size: ignore tensors smaller than this (norm scales).

  Raises:
    ValueError: listing the five largest replicated tensors.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
  considered = [
    (jax.tree_util.keystr(p), int(np.prod(x.shape)), s)
    for (p, x), s in zip(flat, specs)
    if int(np.prod(x.shape)) >= min_size
  ]
  total = sum(n for _, n, _ in considered)
  offenders = sorted(
    ((n, path) for path, n, s in considered if s.is_fully_replicated), reverse=True
  )
  frac = sum(n for n, _ in offenders) / max(total, 1)
  if frac > max_replicated:
    top = ", ".join(f"{path} ({n} elements)" for n, path in offenders[:5])
    raise ValueError(
      f"{frac:.1%} of parameter elements are replicated (allowed "
      f"{max_replicated:.1%}); largest: {top}"
    )
