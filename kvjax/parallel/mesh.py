"""Meshes, the sharded cache layout, and where a jitted step finds its mesh.

The axes are named once: `data` splits the batch, `heads` the kv heads
(query heads follow their kv head: heads are grouped consecutively), and
`seq` the cache slots. Every [L, B, K, S, ...] leaf of a `KVCache` (a
plain payload, a codec's per-slot codes and scales, `pos`, `valid`) is
laid out `P(None, "data", "heads", "seq")`; leaves shared by the slots of
a layer (a codec's rotation) are replicated; the per-row counters follow
`data`. A `TailedKV` (KIVI's code region and full-precision tail) shards
each region on its own, so a shard holds a slice of both.

Inside a jitted step the mesh comes from the context (`jax.set_mesh`, which
`prefill(mesh=...)` and the other entries enter for their call): the
attention, the eviction and the layouts that create capacities read it
with `context_mesh()`, so one definition of each serves one device and
many.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from kvjax.cache import CodedKV, KVCache, TailedKV, host_array

Array = jax.Array

AXES = ("data", "heads", "seq")


def parse_spec(spec: str | dict[str, int] | None, num_devices: int):
  """{axis: size} from "seq:8", "data:2,seq:4" or a dict; None: every
  device on `seq`. One size may be -1: the devices left over."""
  if spec is None or spec == "":
    return {"seq": num_devices}
  if isinstance(spec, str):
    sizes = {}
    for item in spec.split(","):
      name, sep, size = item.strip().partition(":")
      if not sep:
        raise ValueError(
          f"mesh spec {spec!r}: each item is AXIS:SIZE (e.g. 'data:2,seq:4')."
        )
      try:
        sizes[name.strip()] = int(size)
      except ValueError:
        raise ValueError(
          f"mesh spec {spec!r}: size {size!r} of {name!r} is not an int."
        ) from None
  elif isinstance(spec, dict):
    sizes = dict(spec)
  else:
    raise TypeError(
      f"mesh spec must be a str like 'data:2,seq:4', a dict or None, got "
      f"{type(spec).__name__}."
    )
  bad = [a for a in sizes if a not in AXES]
  if bad:
    raise ValueError(f"mesh axes {bad} unknown; allowed: {AXES}.")
  free = [a for a, n in sizes.items() if n == -1]
  if len(free) > 1 or any(n < 1 and n != -1 for n in sizes.values()):
    raise ValueError(
      f"mesh spec {spec!r}: sizes must be >= 1, with at most one -1."
    )
  fixed = math.prod(n for n in sizes.values() if n != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
        f"mesh spec {spec!r}: {num_devices} devices do not divide by {fixed}."
      )
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(
      f"mesh spec {spec!r} has {math.prod(sizes.values())} devices; "
      f"{num_devices} are given."
    )
  return sizes


def make_mesh(
  spec: str | dict[str, int] | None = None, devices=None
) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all) with kvjax's axis names.

  Args:
    spec: "seq:8", "data:2,seq:4", "data:2,heads:2,seq:2" (axes `data`,
      `heads`, `seq`; one size may be -1 for the devices left over), a
      dict, or None (every device on `seq`).
    devices: the devices (default `jax.devices()`, every process's).

  Returns:
    A `jax.sharding.Mesh` with the named axes in the order data, heads,
    seq (Auto axis types: the parts kvjax does not map by hand are
    partitioned by XLA).

  Raises:
    ValueError / TypeError: an unknown axis, a bad size, or sizes whose
      product is not the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_spec(spec, len(devices))
  names = tuple(a for a in AXES if a in sizes)
  shape = tuple(sizes[a] for a in names)
  return jax.make_mesh(
    shape,
    names,
    axis_types=(AxisType.Auto,) * len(names),
    devices=devices,
  )


def check_mesh(mesh) -> jax.sharding.Mesh | None:
  """`mesh` when it is a `jax.sharding.Mesh` (None passes); a mesh with
  Explicit or Manual axes (`jax.make_mesh`'s default) comes back as the
  same devices and names with Auto axes, which kvjax's layout needs (XLA
  partitions what kvjax does not map by hand)."""
  if mesh is None:
    return None
  if isinstance(mesh, jax.sharding.Mesh):
    if any(t != AxisType.Auto for t in mesh.axis_types):
      mesh = jax.sharding.Mesh(
        mesh.devices,
        mesh.axis_names,
        axis_types=(AxisType.Auto,) * len(mesh.axis_names),
      )
    return mesh
  raise TypeError(
    "mesh must be None or a jax.sharding.Mesh (kvjax.parallel.make_mesh), "
    f"got {type(mesh).__name__}."
  )


def context_mesh():
  """The mesh a traced step runs under (`jax.set_mesh`), or None when there
  is none, it splits nothing along kvjax's axes, or the step already runs
  per shard (inside a `shard_map`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  if any(t == AxisType.Manual for t in mesh.axis_types):
    return None
  if all(mesh.shape.get(a, 1) == 1 for a in AXES):
    return None
  explicit = [
    n
    for n, t in zip(mesh.axis_names, mesh.axis_types)
    if n in AXES and t == AxisType.Explicit
  ]
  if explicit:
    raise ValueError(
      f"kvjax.parallel needs Auto mesh axes; {explicit} are Explicit "
      "(jax.make_mesh's default). Build the mesh with "
      "kvjax.parallel.make_mesh, or pass axis_types=(AxisType.Auto, ...), "
      "or hand it to kvjax's entries as mesh= (they convert it)."
    )
  return mesh


def axis_size(mesh, axis: str) -> int:
  """Devices along `axis` (1 when the mesh lacks it or is None)."""
  return 1 if mesh is None else int(mesh.shape.get(axis, 1))


def seq_shards() -> int:
  """Shards of the cache slots under the context mesh (1 without one)."""
  return axis_size(context_mesh(), "seq")


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _axis(mesh, name: str):
  return name if axis_size(mesh, name) > 1 else None


def slot_spec(mesh, ndim: int) -> P:
  """The spec of an [L, B, K, S, ...] leaf."""
  return P(
    None,
    _axis(mesh, "data"),
    _axis(mesh, "heads"),
    _axis(mesh, "seq"),
    *([None] * (ndim - 4)),
  )


def shared_spec(name: str, leaf, codec, mesh, rows: int, heads: int) -> P:
  """The spec of a codec's shared leaf: the dims its codec declares per row
  or kv head (`Codec.shared_axes`: a low-rank basis [L, B, K, ...], a
  channel order [L, K, H]) follow the `data` / `heads` axes; anything else
  (a rotation [L, H, H]) is replicated."""
  axes = dict(codec.shared_axes).get(name, "")
  want = tuple({"b": rows, "k": heads}[a] for a in axes)
  if tuple(leaf.shape[1 : 1 + len(axes)]) != want:
    raise ValueError(
      f"codec {codec.name}: shared leaf {name!r} {tuple(leaf.shape)} does "
      f"not have the [L, {', '.join(axes.upper())}, ...] dims its "
      f"shared_axes={axes!r} declare (B={rows}, K={heads})."
    )
  return P(None, *(_axis(mesh, "data" if a == "b" else "heads") for a in axes))


def payload_specs(x, mesh, rows: int, heads: int):
  """The specs of a payload (plain, `CodedKV`, `TailedKV`) of a cache
  with `rows` rows and `heads` kv heads."""
  if isinstance(x, TailedKV):
    return TailedKV(
      payload_specs(x.code, mesh, rows, heads), slot_spec(mesh, x.tail.ndim)
    )
  if isinstance(x, CodedKV):
    return CodedKV(
      {n: slot_spec(mesh, a.ndim) for n, a in x.slots.items()},
      {
        n: shared_spec(n, a, x.codec, mesh, rows, heads)
        for n, a in x.shared.items()
      },
      x.codec,
    )
  return slot_spec(mesh, x.ndim)


def cache_specs(cache: KVCache, mesh) -> KVCache:
  """The `PartitionSpec` of every leaf of `cache` (a KVCache-shaped tree):
  slots on `seq`, rows on `data`, kv heads on `heads`; shared codec leaves
  follow their declared row / head dims (`Codec.shared_axes`); transform
  state that is not per slot is replicated."""
  row = P(_axis(mesh, "data"))

  def state_spec(x):
    # Transform state: per-slot [L, B, K, S] leaves (H2O's mass) follow the
    # slots; anything else is replicated.
    if getattr(x, "ndim", 0) == 4 and x.shape[-1] == cache.capacity:
      return slot_spec(mesh, 4)
    return P()

  return KVCache(
    k=payload_specs(cache.k, mesh, *cache.pos.shape[1:3]),
    v=payload_specs(cache.v, mesh, *cache.pos.shape[1:3]),
    pos=slot_spec(mesh, 4),
    valid=slot_spec(mesh, 4),
    end=row,
    length=row,
    state=jax.tree.map(state_spec, cache.state),
  )


def _region_sizes(x, capacity: int) -> list[tuple[str, int, int]]:
  """(what, slots, granule) of each storage region of a payload."""
  if isinstance(x, TailedKV):
    sc = x.code_slots
    return [
      ("code region", sc, _granule(x.code, sc)),
      ("full-precision tail", capacity - sc, 1),
    ]
  if isinstance(x, CodedKV):
    return [("payload", capacity, _granule(x, capacity))]
  return [("payload", capacity, 1)]


def _granule(code: CodedKV, size: int) -> int:
  g = 1
  for leaf in code.slots.values():
    g = max(g, size // max(leaf.shape[3], 1))
  return g


def check_divisible(cache_or_view_k, capacity: int, shards: int, what: str):
  """Raises when a region of the payload does not split into `shards`
  whole slices (each a whole number of statistic groups)."""
  for name, size, granule in _region_sizes(cache_or_view_k, capacity):
    if size % (shards * granule):
      raise ValueError(
        f"{what}: the {name} has {size} slots, not a multiple of {shards} "
        f"seq shards x {granule} slots per statistic group; place the cache "
        "with kvjax.parallel.shard_cache (it pads the capacity) or build it "
        "under the mesh (prefill(mesh=...))."
      )


def constrain_cache(cache: KVCache, mesh=None) -> KVCache:
  """`cache` with every leaf constrained to its layout on `mesh` (default:
  the context mesh); unchanged without a mesh. For use inside `jit`."""
  mesh = context_mesh() if mesh is None else mesh
  if mesh is None:
    return cache
  specs = cache_specs(cache, mesh)
  fix = lambda x, s: jax.lax.with_sharding_constraint(x, s)
  S = cache.capacity
  # Transform state: only its per-slot leaves (left alone otherwise).
  state = jax.tree.map(
    lambda x, s: (
      fix(x, s) if getattr(x, "ndim", 0) == 4 and x.shape[-1] == S else x
    ),
    cache.state,
    specs.state,
  )
  body = jax.tree.map(fix, cache._replace(state=()), specs._replace(state=()))
  return body._replace(state=state)


class Sharded(NamedTuple):
  """What `shard_cache` returns.

  Attributes:
    cache: the cache, every leaf placed on the mesh.
    padding: empty slots added per (layer, row, kv head) so that each
      storage region splits evenly over the `seq` shards (0: none).
  """

  cache: KVCache
  padding: int


def _pad_slots(x: Array, at: int, n: int, value) -> Array:
  """x [L, B, K, S, ...] with n slots of `value` inserted before slot `at`."""
  if n == 0:
    return x
  shape = x.shape[:3] + (n,) + x.shape[4:]
  fill = jnp.full(shape, value, x.dtype)
  return jnp.concatenate([x[:, :, :, :at], fill, x[:, :, :, at:]], axis=3)


def _pad_code(code: CodedKV, extra: int, size: int) -> CodedKV:
  slots = {}
  for n, leaf in code.slots.items():
    per = size // leaf.shape[3]  # slots per leaf entry
    slots[n] = _pad_slots(leaf, leaf.shape[3], extra // per, 0)
  return CodedKV(slots, code.shared, code.codec)


def pad_for_shards(cache: KVCache, shards: int) -> tuple[KVCache, int]:
  """Pads each storage region of `cache` with empty slots (invalid,
  position -1) to split into `shards` whole slices; returns (cache,
  slots added). Writes continue where they would have: a row writing into
  a KIVI tail has its write index moved past the code region's padding."""
  S = cache.capacity
  if isinstance(cache.k, TailedKV) != isinstance(cache.v, TailedKV):
    raise ValueError("shard_cache: keys and values have different layouts.")
  if isinstance(cache.k, TailedKV):
    sc = cache.k.code_slots
    if cache.v.code_slots != sc:
      raise ValueError("shard_cache: key and value code regions differ.")
    g = max(_granule(cache.k.code, sc), _granule(cache.v.code, sc))
    add_c = round_up(sc, shards * g) - sc
    add_t = round_up(S - sc, shards) - (S - sc)

    def pad(x: TailedKV):
      code = _pad_code(x.code, add_c, sc)
      return TailedKV(code, _pad_slots(x.tail, S - sc, add_t, 0))

    pos = _pad_slots(_pad_slots(cache.pos, S, add_t, -1), sc, add_c, -1)
    valid = _pad_slots(
      _pad_slots(cache.valid, S, add_t, False), sc, add_c, False
    )
    end = jnp.where(cache.end >= sc, cache.end + add_c, cache.end)
    # An overflowed row (end past the capacity) stays past the new one.
    end = jnp.where(cache.end > S, end + add_t, end)
    out = cache._replace(
      k=pad(cache.k), v=pad(cache.v), pos=pos, valid=valid, end=end
    )
    return _pad_state(out, cache, S, ((sc, add_c), (S, add_t))), add_c + add_t
  g = max(
    _granule(x, S) if isinstance(x, CodedKV) else 1 for x in (cache.k, cache.v)
  )
  add = round_up(S, shards * g) - S

  def pad(x):
    if isinstance(x, CodedKV):
      return _pad_code(x, add, S)
    return _pad_slots(x, S, add, 0)

  out = cache._replace(
    k=pad(cache.k),
    v=pad(cache.v),
    pos=_pad_slots(cache.pos, S, add, -1),
    valid=_pad_slots(cache.valid, S, add, False),
    # An overflowed row (end past the capacity) stays past the new one.
    end=jnp.where(cache.end > S, cache.end + add, cache.end),
  )
  return _pad_state(out, cache, S, ((S, add),)), add


def _pad_state(new: KVCache, old: KVCache, S: int, inserts) -> KVCache:
  """Per-slot [L, B, K, S] leaves of the transform state padded like the
  slots: `inserts` (at, count), applied from the last."""

  def pad(x):
    if getattr(x, "ndim", 0) == 4 and x.shape[-1] == S:
      for at, n in sorted(inserts, reverse=True):
        x = _pad_slots(x, at, n, 0)
    return x

  return new._replace(state=jax.tree.map(pad, old.state))


def shard_cache(cache: KVCache, mesh: jax.sharding.Mesh) -> Sharded:
  """Places every leaf of `cache` on `mesh`: slots along `seq`, rows along
  `data`, kv heads along `heads` (plain or coded payloads, `pos`, `valid`,
  per-slot transform state; shared codec leaves per row / head split with
  them, the others replicated).

  Capacity is padded with empty slots so each storage region splits into
  whole slices (a whole number of statistic groups for KIVI's per-channel
  key statistics); the padding is returned, and warned about when nonzero.
  An overflowed cache (`kvjax.cache.cache_overflowed`) stays flagged: its
  rows' `end` moves past the padded capacity, on the device (no read-back,
  so `decode_step(mesh=...)` places its cache every step without a sync).

  Raises:
    ValueError: a batch or kv-head count the `data` / `heads` axes do not
      divide.
  """
  mesh = check_mesh(mesh)
  if mesh is None:
    raise ValueError("shard_cache needs a mesh (kvjax.parallel.make_mesh).")
  if not isinstance(cache, KVCache):
    raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}.")
  _check_rows_heads(cache.batch_size, cache.pos.shape[2], mesh, "shard_cache")
  cache, added = pad_for_shards(cache, axis_size(mesh, "seq"))
  if added:
    import warnings

    warnings.warn(
      f"shard_cache: {added} empty slots per (layer, row, kv head) added so "
      f"the cache splits over {axis_size(mesh, 'seq')} seq shards.",
      stacklevel=2,
    )
  specs = cache_specs(cache, mesh)
  placed = jax.tree.map(
    lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs
  )
  return Sharded(placed, added)


def _check_rows_heads(B: int, K: int, mesh, what: str) -> None:
  for axis, n, name in (("data", B, "batch size"), ("heads", K, "kv heads")):
    if n % axis_size(mesh, axis):
      raise ValueError(
        f"{what}: {name} {n} does not split over the mesh's "
        f"{axis_size(mesh, axis)} '{axis}' devices."
      )


def device_bytes(tree: Any) -> dict[Any, int]:
  """{device: physical bytes of the shards it holds} over every array leaf
  of `tree` (a cache, params, ...), from the arrays' own shards."""
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, "addressable_shards", ()):
      d = shard.data
      out[shard.device] = out.get(shard.device, 0) + int(d.size) * int(
        np.dtype(d.dtype).itemsize
      )
  return out


def to_host(tree: Any) -> Any:
  """`tree` with every jax.Array leaf as a NumPy array holding its global
  value, also when it spans devices of other processes (gathered with
  `multihost_utils.process_allgather`, a collective: every process calls
  it in the same order). Other leaves pass unchanged."""
  return jax.tree.map(
    lambda x: host_array(x) if isinstance(x, jax.Array) else x, tree
  )
