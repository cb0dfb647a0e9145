"""Sharded == unsharded on 8 simulated CPU devices (launch/test.sh sets
`--xla_force_host_platform_device_count=8`): tokens, logits, kept sets,
the global top-k, ring attention, decode from a placed cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import compress
from kvjax import parallel
from kvjax.compress import base

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: run through launch/test.sh (it simulates 8 CPUs)",
)

CONFIG = kvjax.ModelConfig(
  vocab_size=64,
  d_model=32,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=16,
  mlp_dim=64,
  max_position_embeddings=128,
  dtype="float32",
  name="sharded",
)
PARAMS = kvjax.init_params(CONFIG, jax.random.key(0), std=0.3)
B, T, NEW = 2, 48, 4
TOKENS = np.asarray(jax.random.randint(jax.random.key(1), (B, T), 1, 64))
LENGTHS = np.array([48, 37], np.int32)  # ragged rows


def _kivi():
  return compress.kivi(2, group_size=8, residual=16)


METHODS = {
  "none": lambda: None,
  "snapkv": lambda: compress.snapkv(0.5, window_size=8),
  "h2o": lambda: compress.h2o(budget=24),  # decode-time
  "kivi2": _kivi,
  "turboquant3": lambda: compress.turboquant(3),
  "snapkv+kivi2": lambda: compress.chain(
    compress.snapkv(0.5, window_size=8), _kivi()
  ),
  # A head-variable policy (scores flattened over heads) and a codec with a
  # basis per (row, kv head): both must follow the data and heads axes.
  "adakv+lowrank": lambda: compress.chain(
    compress.adakv("snapkv", 0.5, window_size=8), compress.lowrank(8)
  ),
  # A channel order per kv head ([L, K, H]): split with the heads.
  "turboquant3+outliers": lambda: compress.turboquant(
    3, outlier_channels=8, outlier_bits=4
  ),
}
# Every method on the pure sequence mesh (TurboQuant's outlier order only
# where the heads split); the mixed meshes on the methods whose sharded
# paths differ most (decode-time eviction, the code region plus tail, codes
# with a shared rotation, shared leaves per row and head).
# (kivi2, turboquant3 and snapkv alone run on the mixed meshes only: the
# pure sequence mesh reads their payloads as snapkv+kivi2 and h2o do.)
CASES = [
  (m, "seq:8")
  for m in METHODS
  if m not in ("turboquant3+outliers", "kivi2", "turboquant3", "snapkv")
] + [
  ("h2o", "data:2,seq:4"),
  ("snapkv+kivi2", "data:2,seq:4"),
  ("snapkv", "data:2,heads:2,seq:2"),
  ("turboquant3", "data:2,heads:2,seq:2"),
  ("kivi2", "data:2,heads:2,seq:2"),
  ("adakv+lowrank", "data:2,heads:2,seq:2"),
  ("turboquant3+outliers", "data:2,heads:2,seq:2"),
]
_REF = {}


def _generate(method, mesh=None):
  return kvjax.generate(
    PARAMS,
    TOKENS,
    config=CONFIG,
    max_new_tokens=NEW,
    prompt_lengths=LENGTHS,
    transform=METHODS[method](),
    mesh=mesh,
  )


def _kept(cache):
  """Per (layer, row, kv head): the sorted positions of the valid slots."""
  pos, valid = np.asarray(cache.pos), np.asarray(cache.valid)
  return [
    sorted(pos[idx][valid[idx]].tolist()) for idx in np.ndindex(pos.shape[:3])
  ]


@pytest.mark.parametrize("method,spec", CASES)
def test_generate_sharded_equals_unsharded(method, spec):
  if method not in _REF:
    _REF[method] = _generate(method)
  ref = _REF[method]
  mesh = parallel.make_mesh(spec)
  out = _generate(method, mesh)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(
    np.asarray(out.prompt_logits), np.asarray(ref.prompt_logits), atol=1e-5
  )
  assert _kept(out.cache) == _kept(ref.cache)
  # The cache stays in its sharded layout, every device holding a slice.
  per_device = parallel.device_bytes(out.cache)
  assert len(per_device) == 8
  assert (
    out.cache.pos.sharding.spec == parallel.cache_specs(out.cache, mesh).pos
  )
  seq = mesh.shape["seq"]
  assert out.cache.capacity % seq == 0
  print(
    f"{method} on {spec}: capacity {ref.cache.capacity} -> "
    f"{out.cache.capacity}, bytes per device {sorted(per_device.values())}"
  )


@pytest.mark.parametrize("spec", ["seq:8", "data:2,heads:2,seq:2"])
def test_global_top_k_equals_unsharded(spec):
  mesh = parallel.make_mesh(spec)
  L, K, S = 2, 2, 64
  # Few distinct values: many ties, which must go to the lower slot; -0.0
  # ties with 0.0, a NaN or -inf ranks lowest among the valid slots, on
  # every path.
  scores = jax.random.randint(jax.random.key(2), (L, B, K, S), -2, 3)
  scores = scores.astype(jnp.float32) * 0.5
  scores = jnp.where(
    scores == 0, jnp.where(jnp.arange(S) % 2, -0.0, 0.0), scores
  )
  scores = scores.at[:, :, :, 7].set(jnp.nan).at[:, :, :, 40].set(-jnp.inf)
  valid = jax.random.bernoulli(jax.random.key(3), 0.8, (L, B, K, S))
  n = jax.random.randint(jax.random.key(4), (L, B, K), 0, 30)
  # Some heads ask for every valid slot: NaN and -inf ones included.
  n = n.at[0, 0].set(valid[0, 0].sum(-1)).at[1, 1, 1].set(S)
  want = base.keep_top(scores, n, valid)
  np.testing.assert_array_equal(
    np.asarray(want.sum(-1)), np.minimum(n, valid.sum(-1))
  )
  spec4 = parallel.cache_specs(kvjax.init_cache(CONFIG, B, S), mesh).pos
  sharding = jax.sharding.NamedSharding(mesh, spec4)
  for bound in (None, 30):
    with jax.set_mesh(mesh):
      got = jax.jit(base.keep_top, static_argnums=3)(
        jax.device_put(scores, sharding),
        n,
        jax.device_put(valid, sharding),
        bound,
      )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # A head asked for more than the bound keeps every valid slot (the
  # compaction after it then reports the overflow), never a silent cut.
  with jax.set_mesh(mesh):
    got = base.keep_top(scores, jnp.full((L, B, K), 20), valid, 10)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(valid))


def test_ring_attention_equals_attention():
  mesh = parallel.make_mesh("data:2,seq:4")
  Tq, N, K, H = 32, 4, 2, 16
  ks = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(ks[0], (B, Tq, N, H))
  k = jax.random.normal(ks[1], (B, Tq, K, H))
  v = jax.random.normal(ks[2], (B, Tq, K, H))
  pos = jnp.broadcast_to(jnp.arange(Tq), (B, Tq))
  live = pos < jnp.array([[Tq], [21]])  # a ragged row
  for window in (None, 6):
    want = kvjax.attention.attention(
      q,
      jnp.moveaxis(k, 1, 2),
      jnp.moveaxis(v, 1, 2),
      q_pos=pos,
      k_pos=jnp.broadcast_to(pos[:, None], (B, K, Tq)),
      k_valid=jnp.broadcast_to(live[:, None], (B, K, Tq)),
      sliding_window=window,
    )
    with jax.set_mesh(mesh):
      got = jax.jit(
        lambda q, k, v: parallel.ring_attention(
          q,
          k,
          v,
          q_pos=pos,
          k_pos=pos,
          k_valid=live,
          sliding_window=window,
          mesh=mesh,
        )
      )(q, k, v)
    np.testing.assert_allclose(got.out, want.out, atol=1e-5)
    np.testing.assert_allclose(got.lse, want.lse, atol=1e-5)


def test_decode_places_a_cache_and_compiles_once(count_compiles):
  """A KIVI cache prefilled on one device, decoded on a mesh: its code
  region and tail are padded apart (reported), the tokens are the
  single-device ones, and a second call compiles nothing."""
  tr = _kivi()
  pre = kvjax.prefill(
    PARAMS,
    TOKENS,
    config=CONFIG,
    transform=tr,
    prompt_lengths=LENGTHS,
    capacity=T + 8,
    decode_steps=6,
  )
  first = jnp.array([3, 5], jnp.int32)
  kw = dict(config=CONFIG, max_new_tokens=6, transform=tr)
  ref = kvjax.decode(PARAMS, pre.cache, first, **kw)
  mesh = parallel.make_mesh("seq:8")
  with pytest.warns(UserWarning, match="empty slots"):
    placed = parallel.shard_cache(pre.cache, mesh)
  assert placed.padding > 0
  assert placed.cache.capacity == pre.cache.capacity + placed.padding
  out = kvjax.decode(PARAMS, placed.cache, first, mesh=mesh, **kw)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  assert _kept(out.cache) == _kept(ref.cache)
  with count_compiles() as c:
    again = kvjax.decode(PARAMS, out.cache, first, mesh=mesh, **kw)
    jax.block_until_ready(again.tokens)
  assert c["n"] == 0
  total = sum(parallel.device_bytes(out.cache).values())
  assert total >= kvjax.cache.kv_bytes(out.cache)  # replicated leaves count


def test_bad_meshes():
  with pytest.raises(ValueError, match="allowed"):
    parallel.make_mesh("rows:8")
  with pytest.raises(ValueError, match="has 4 devices"):
    parallel.make_mesh("seq:4")
  with pytest.raises(ValueError, match="AXIS:SIZE"):
    parallel.make_mesh("seq8")
  assert parallel.make_mesh("data:2,seq:-1").shape["seq"] == 4
  with pytest.raises(TypeError, match="jax.sharding.Mesh"):
    kvjax.generate(
      PARAMS, TOKENS, config=CONFIG, max_new_tokens=1, mesh="seq:8"
    )
  with pytest.raises(ValueError, match="kv heads 2 does not split"):
    kvjax.generate(
      PARAMS,
      TOKENS,
      config=CONFIG,
      max_new_tokens=1,
      mesh=parallel.make_mesh("heads:4,seq:2"),
    )
  explicit = jax.make_mesh(
    (8,), ("seq",), axis_types=(jax.sharding.AxisType.Explicit,)
  )
  with jax.set_mesh(explicit):
    with pytest.raises(ValueError, match="Auto mesh axes"):
      parallel.context_mesh()
  # Handed over as mesh=, it is converted.
  assert parallel.mesh.check_mesh(explicit).axis_types == (
    jax.sharding.AxisType.Auto,
  )


@pytest.mark.parametrize("method", ["none", "kivi2"])
def test_shard_cache_keeps_an_overflow_flagged(method):
  # A cache whose jitted writes ran past capacity (end > capacity) stays
  # flagged after placing: the padding must not make room that hides it.
  out = _REF.get(method) or _generate(method)
  S = out.cache.capacity
  cache = out.cache._replace(end=out.cache.end.at[0].set(S + 1))
  with pytest.warns(UserWarning, match="empty slots"):
    placed, padding = parallel.shard_cache(cache, parallel.make_mesh("seq:8"))
  assert padding > 0
  end = np.asarray(placed.end)
  # Row 1 did not overflow: its write index moves with the padding before
  # it (KIVI's code region), never past the capacity.
  assert end[0] > placed.capacity and end[1] <= placed.capacity
  assert end[1] >= np.asarray(cache.end)[1]
  assert kvjax.cache.cache_overflowed(placed)
