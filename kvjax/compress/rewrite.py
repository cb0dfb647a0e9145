"""Transforms that rewrite what the kept entries hold (kvjax issue 18, group
D): merged values, re-rotated keys, pruned key channels.

- `merging`: a wrapper around any prefill policy; each evicted entry's
  value is folded into its most key-cosine-similar survivor (kvpress
  `MergingPress`).
- `key_rerotation`: a wrapper around any policy; after eviction the kept
  keys are re-rotated to contiguous positions 0..n-1 and new tokens
  continue at n (kvpress `KeyRerotationPress`, StreamingLLM's positions).
- `think`: ThinK key-channel pruning that stores only the kept channels
  (kvpress `ThinKPress` zeroes them and saves nothing).
- `cam`: CaM, decode-time eviction to a target size every N passes, the
  evicted values merged into the kept neighbours that follow them (kvpress
  `CAMPress`).

All of them compact for real (the wrapped policy's `base.evict` /
`base.compact`, or a smaller key payload) and work under `jit`, with ragged
batches and in `kvjax.generate`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from kvjax.cache import Codec, CodedKV, is_coded
from kvjax.compress import base
from kvjax.compress import policies
from kvjax.model import rope_inv_freq
from pallas_kernels import tiles

Array = jax.Array
_EPS = 1e-6  # kvpress MergingPress' norm clamp


def _check_transform(press, who: str) -> base.KVTransform:
  if not isinstance(press, base.KVTransform):
    raise TypeError(
      f"{who} wraps a KVTransform (a policy such as snapkv(0.5)), got "
      f"press={press!r} of type {type(press).__name__}."
    )
  if press.bits is not None:
    raise ValueError(
      f"{who} wraps an eviction policy; press={press.name!r} is (or ends "
      "with) a codec. Chain the codec after the wrapper instead."
    )
  return press


def _float_payload(x, who: str) -> Array:
  if is_coded(x) or not isinstance(x, jax.Array) or x.ndim != 5:
    raise ValueError(
      f"{who} rewrites float keys and values [L, B, K, S, H]; this cache's "
      f"payload is {x!r}. Apply {who} before any codec in a chain."
    )
  return x


def _source_slots(before_pos, before_valid, after_pos, after_valid):
  """[L, B, K, S'] slot of `before` holding each valid slot of `after`
  (matched by position, unique per head); 0 for invalid slots."""
  big = jnp.iinfo(jnp.int32).max
  key = jnp.where(before_valid, before_pos, big)
  order = jnp.argsort(key, axis=-1, stable=True)
  ranked = jnp.take_along_axis(key, order, axis=-1)
  find = jnp.vectorize(
    lambda a, v: jnp.searchsorted(a, v), signature="(s),(t)->(t)"
  )
  at = jnp.clip(find(ranked, after_pos), 0, key.shape[-1] - 1)
  src = jnp.take_along_axis(order, at, axis=-1)
  return jnp.where(after_valid, src, 0)


# ----------------------------------------------------------------------------
# Merging.


def _quantile(x: Array, count: Array, q: float) -> Array:
  """torch.quantile (linear) over the first `count` entries of each row of
  sorted-ascending x [..., n] (count [...] >= 1)."""
  pos = q * (count.astype(jnp.float32) - 1.0)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.ceil(pos).astype(jnp.int32)
  a = jnp.take_along_axis(x, lo[..., None], axis=-1)[..., 0]
  b = jnp.take_along_axis(x, hi[..., None], axis=-1)[..., 0]
  w = pos - lo
  return jnp.where(hi == lo, a, a + w * (b - a))


def merge_values(
  k: Array,
  v: Array,
  kept: Array,
  evicted: Array,
  similarity_threshold: float = 0.0,
  merge_fraction: float = 1.0,
) -> Array:
  """Values after folding each evicted entry into its nearest survivor.

  One (layer, row, head) at a time (vmap the leading axes): each evicted
  slot e finds the kept slot t of largest key cosine similarity s_e (norms
  clamped at 1e-6); it merges when s_e >= similarity_threshold and s_e is
  in the top `merge_fraction` of the evicted slots' similarities (torch's
  linear quantile). Its weight is w_e = max(s_e, 0) |v_e| / (|v_e| + |v_t|
  + 1e-6); a survivor t that receives any weight becomes
  (v_t + sum_e w_e v_e) / (1 + sum_e w_e). As kvpress `MergingPress`.

  Args:
    k, v: [S, H] keys and values.
    kept, evicted: [S] bool (disjoint; other slots take no part).

  Returns:
    [S, H] float32 values (only kept slots change).
  """
  kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
  unit = kf / jnp.maximum(jnp.linalg.norm(kf, axis=-1, keepdims=True), _EPS)
  sim = unit @ unit.T  # [S(evicted), S(kept)]
  sim = jnp.where(kept[None, :], sim, -jnp.inf)
  target = jnp.argmax(sim, axis=-1)  # first maximum, as torch
  best = jnp.max(sim, axis=-1)
  ok = evicted & (best >= similarity_threshold)
  if merge_fraction < 1.0:
    # the evicted entries' similarities ascending (-inf: failed the
    # threshold), then +inf for the other slots (not counted)
    n_ev = jnp.sum(evicted)
    vals = jnp.sort(jnp.where(evicted, jnp.where(ok, best, -jnp.inf), jnp.inf))
    thr = _quantile(vals, jnp.maximum(n_ev, 1), 1.0 - merge_fraction)
    ok = ok & (best >= thr)
  vnorm = jnp.linalg.norm(vf, axis=-1)
  w = jnp.maximum(best, 0.0) * ok
  w = w * vnorm / (vnorm + vnorm[target] + _EPS)
  w = jnp.where(ok, w, 0.0)
  onehot = (jnp.arange(k.shape[0])[None, :] == target[:, None]) & ok[:, None]
  to = jnp.where(onehot, w[:, None], 0.0)  # [S(evicted), S(kept)]
  acc = to.T @ vf  # [S, H]
  wsum = jnp.sum(to, axis=0)  # [S]
  merged = (vf + acc) / (1.0 + wsum)[:, None]
  return jnp.where((kept & (wsum > 0))[:, None], merged, vf)


@base.by_value
def merging(
  press: base.KVTransform,
  similarity_threshold: float = 0.0,
  merge_fraction: float = 1.0,
) -> base.KVTransform:
  """Merge-on-evict: the wrapped policy selects, evicted values are folded
  into their most similar survivors (kvpress `MergingPress`).

  Definition: `merge_values` (per layer, row and kv head: cosine of keys
  picks the survivor, weight max(sim, 0) |v_e| / (|v_e| + |v_t| + eps),
  normalized blend). Keys are unchanged (RoPE-safe). Source: Token Merging
  (arXiv 2210.09461) and D2O (arXiv 2406.13035) as kvpress 0.5.5
  `MergingPress` combines them.

  Differs from kvpress: the wrapped transform is any prefill-time kvjax
  policy (kvpress takes a ScorerPress); the kept set is exactly the wrapped
  policy's (recovered from its compacted output by position), so its
  budgets, reserve and ragged rows apply unchanged and memory is saved by
  its compaction. Only the prefill compression merges: a wrapped decode-
  time policy's later evictions drop entries without merging (kvpress'
  press acts at prefill only). Merging costs an [S, S] similarity matrix
  per (row, kv head), computed one layer at a time.

  Args:
    press: the policy that decides which entries survive (not a codec).
    similarity_threshold: minimum cosine similarity to merge, in [0, 1].
    merge_fraction: share of evicted entries (most similar first) merged,
      in (0, 1].

  Raises:
    TypeError / ValueError: a press that is not a policy, thresholds out
      of range.
  """
  _check_transform(press, "merging")
  if "key_rerotation" in press.name.split("+"):
    raise ValueError(
      "merging matches kept entries to the cache by original position, "
      "which key_rerotation rewrites: wrap the other way round, "
      "key_rerotation(merging(policy))."
    )
  if (
    isinstance(similarity_threshold, bool)
    or not isinstance(similarity_threshold, (int, float))
    or not 0.0 <= similarity_threshold <= 1.0
  ):
    raise ValueError(
      "similarity_threshold must be a float in [0, 1], got "
      f"{similarity_threshold!r}."
    )
  if (
    isinstance(merge_fraction, bool)
    or not isinstance(merge_fraction, (int, float))
    or not 0.0 < merge_fraction <= 1.0
  ):
    raise ValueError(
      f"merge_fraction must be a float in (0, 1], got {merge_fraction!r}."
    )
  merge_one = lambda k, v, kp, ev: merge_values(
    k, v, kp, ev, float(similarity_threshold), float(merge_fraction)
  )
  per_layer = jax.vmap(jax.vmap(merge_one))  # over B, K

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill":
      return press.apply(cache, state, ctx, **extra)
    k = _float_payload(cache.k, "merging")
    v = _float_payload(cache.v, "merging")
    out, state = press.apply(cache, state, ctx, **extra)
    vout = _float_payload(out.v, "merging")
    src = _source_slots(cache.pos, cache.valid, out.pos, out.valid)
    L, B, K, S = cache.pos.shape
    li, bi, ki = jnp.meshgrid(
      jnp.arange(L), jnp.arange(B), jnp.arange(K), indexing="ij"
    )
    kept = jnp.zeros((L, B, K, S), bool)
    kept = kept.at[li[..., None], bi[..., None], ki[..., None], src].max(
      out.valid
    )
    evicted = cache.valid & ~kept
    merged = jax.lax.map(
      lambda xs: per_layer(*xs), (k, v, kept, evicted)
    )  # [L, B, K, S, H]
    new_v = jnp.take_along_axis(merged, src[..., None], axis=3)
    new_v = jnp.where(out.valid[..., None], new_v.astype(vout.dtype), vout)
    return out._replace(v=new_v), state

  return press._replace(apply=apply, name="merging")


# ----------------------------------------------------------------------------
# Key re-rotation.


def rotate_keys(k: Array, delta: Array, inv_freq) -> Array:
  """k [..., H] rotated by `delta` [...] more positions (rotate-half RoPE:
  k cos(delta f) + rotate_half(k) sin(delta f)), in float32."""
  freqs = delta.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  cos, sin = jnp.cos(freqs), jnp.sin(freqs)
  x1, x2 = jnp.split(k.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rerotate(cache, inv_freq):
  """Re-rotates every valid key to its rank among the valid entries of its
  (layer, row, kv head) in position order (0..n-1), records that rank in
  `pos`, and sets each row's `length` (the next token's position) to its
  largest count n over layers and heads."""
  k = _float_payload(cache.k, "key_rerotation")
  big = jnp.iinfo(jnp.int32).max
  key = jnp.where(cache.valid, cache.pos, big)
  rank = jnp.argsort(jnp.argsort(key, axis=-1, stable=True), axis=-1)
  new_pos = jnp.where(cache.valid, rank, -1).astype(jnp.int32)
  delta = jnp.where(cache.valid, new_pos - cache.pos, 0)
  new_k = rotate_keys(k, delta, inv_freq).astype(k.dtype)
  count = jnp.sum(cache.valid, axis=-1).astype(jnp.int32)  # [L, B, K]
  length = jnp.max(count, axis=(0, 2))
  return cache._replace(k=new_k, pos=new_pos, length=length)


@base.by_value
def key_rerotation(press: base.KVTransform) -> base.KVTransform:
  """Keys re-rotated to contiguous positions after eviction (kvpress
  `KeyRerotationPress`; StreamingLLM's positions within the cache, arXiv
  2309.17453, as HF's SinkCache).

  After the wrapped policy evicts, the kept entries of each (layer, row,
  kv head), in position order, move to positions 0..n-1: each key k at
  original position p is rotated by (i - p) (RoPE is a rotation, so
  R(i - p) R(p) k = R(i) k). New tokens continue at position n.

  Position convention (kvjax): the cache records the re-rotated positions.
  `pos` holds 0..n-1 (not the original positions, which are gone, as in
  kvpress' cache) and `length` becomes n per row, so `forward`/`decode`
  give the next token position n, as kvpress' pipeline does
  (`context_length = cache.get_seq_length()`). With head-variable budgets
  (Ada-KV) `length` is the largest head count. A wrapped decode-time
  policy (e.g. `streaming_llm(every=1)`) is re-rotated after each of its
  decode steps too, so positions stay 0..n-1 (StreamingLLM's definition);
  the keys must then stay float (a codec after it applies at prefill only
  and is refused at decode).

  Differs from kvpress: any kvjax policy can be wrapped (kvpress takes a
  ScorerPress); memory is saved by the wrapped policy's compaction.

  Args:
    press: the policy that decides which entries survive (not a codec).
  """
  _check_transform(press, "key_rerotation")

  def apply(cache, state, ctx, **extra):
    if ctx.phase != "prefill" and not press.every:
      return cache, state
    if ctx.phase != "prefill" and is_coded(cache.k):
      raise ValueError(
        f"key_rerotation re-rotates the keys after each decode eviction of "
        f"{press.name}, but a codec chained after it has coded them. Wrap a "
        "prefill-only policy (e.g. scored_policy(streaming_llm_scorer(), "
        "ratio)) to chain a codec after key_rerotation."
      )
    out, state = press.apply(cache, state, ctx, **extra)
    inv_freq = rope_inv_freq(ctx.geometry)
    return rerotate(out, inv_freq), state

  return press._replace(apply=apply, name="key_rerotation")


# ----------------------------------------------------------------------------
# ThinK.


@dataclasses.dataclass(frozen=True)
class ThinkTile(tiles.Plain):
  """How the Pallas kernels read `think_codec` keys: the kept channels
  as a plain [n, kept] tile, scored by the query gathered on them once
  (outside the kernel)."""

  def kernel_leaves(self, enc):
    return super().kernel_leaves({"x": enc["kept"]})

  def query(self, q, shared):
    ch = shared["channels"]  # [B, K, kept]
    return (jnp.take_along_axis(q, ch[..., None, :], axis=-1),)


def think_codec(head_dim: int, kept: int) -> Codec:
  """Keys stored on `kept` of their `head_dim` channels: the per-entry leaf
  "kept" [B, K, S, kept] (the key's dtype) holds the channels listed in the
  shared leaf "channels" [B, K, kept] int32 (per row and kv head, ascending).
  q.k is computed on the kept channels (the query is gathered once);
  `decode` puts zeros in the pruned channels (what kvpress stores)."""

  def gather(x, ch):  # x [B, K, M, H], ch [B, K, kept]
    return jnp.take_along_axis(x, ch[:, :, None, :], axis=-1)

  def encode(x, shared):
    return {"kept": gather(x, shared["channels"])}

  def decode(enc, shared):
    return _scatter_channels(
      enc["kept"].astype(jnp.float32), shared["channels"], head_dim
    )

  def scores(q, enc, shared):
    qk = gather(q.astype(jnp.float32), shared["channels"])
    return jnp.einsum("bkmc,bksc->bkms", qk, enc["kept"].astype(jnp.float32))

  return Codec(
    f"think{kept}/{head_dim}",
    encode,
    decode,
    scores,
    lambda h: 16 * kept / h,  # nominal (bf16); `kv_bytes` counts the real
    ("think", head_dim, kept),
    ThinkTile(),
    shared_axes=(("channels", "bk"),),
  )


def is_channel_pruned(x) -> bool:
  """True for keys stored by `think` alone (a `think_codec` payload)."""
  return (
    isinstance(x, CodedKV)
    and len(x.codec.params) == 3
    and x.codec.params[0] == "think"
  )


def pruned_codec(head_dim: int, kept: int, inner: Codec) -> Codec:
  """`inner` (a codec built for `kept` channels) applied to the kept
  channels of keys pruned by `think`: what `chain(think(...), codec)`
  stores. Shared leaves: "channels" [B, K, kept] plus the inner codec's
  (none, for the per-entry codecs this composes with). q.k: the query
  gathered on the kept channels, then the inner codec's `scores` (or its
  decoded entries). No Pallas tile format: the Pallas backends run it on
  the XLA engine (with kvjax's fallback warning)."""

  def split(shared):
    return shared["channels"], {
      n: a for n, a in shared.items() if n != "channels"
    }

  def gather(x, ch):
    return jnp.take_along_axis(x, ch[:, :, None, :], axis=-1)

  def encode(x, shared):
    ch, rest = split(shared)
    return inner.encode(gather(x, ch), rest)

  def decode(enc, shared):
    ch, rest = split(shared)
    return _scatter_channels(inner.decode(enc, rest), ch, head_dim)

  def scores(q, enc, shared):
    ch, rest = split(shared)
    qk = gather(q.astype(jnp.float32), ch)
    if inner.scores is not None:
      return inner.scores(qk, enc, rest)
    return jnp.einsum("bkmc,bksc->bkms", qk, inner.decode(enc, rest))

  return Codec(
    f"think{kept}/{head_dim}+{inner.name}",
    encode,
    decode,
    scores,
    lambda h: inner.bits(kept) * kept / h,
    ("think", head_dim, kept, inner.params) if inner.params else (),
    None,
    shared_axes=(("channels", "bk"),) + tuple(inner.shared_axes),
  )


def recode_channels(k: CodedKV, key_codec) -> CodedKV:
  """Keys pruned by `think` re-stored with `key_codec(kept)` on their kept
  channels (`pruned_codec`); for `kvjax.compress.codecs.quantize`."""
  _, head_dim, kept = k.codec.params
  try:
    inner = key_codec(kept)
  except ValueError as e:
    raise ValueError(
      f"think keeps {kept} of the {head_dim} key channels, so the key codec "
      f"after it is built for {kept} channels, which it refuses: {e}"
    ) from None
  if inner.encode is None:
    raise ValueError(
      f"codec {inner.name} cannot encode entries one at a time; it cannot "
      "follow think."
    )
  enc = jax.vmap(inner.encode)(k.slots["kept"].astype(jnp.float32), {})
  return CodedKV(enc, dict(k.shared), pruned_codec(head_dim, kept, inner))


def _scatter_channels(vals: Array, ch: Array, head_dim: int) -> Array:
  """vals [B, K, S, C] placed at channels ch [B, K, C] of zeros [.., H]."""
  onehot = (ch[..., None] == jnp.arange(head_dim)).astype(jnp.float32)
  return jnp.einsum("bksc,bkch->bksh", vals, onehot)


def think_channels(
  q: Array, q_mask: Array, k: Array, valid: Array, window_size: int, n_keep: int
) -> Array:
  """ThinK's kept key channels [L, B, K, n_keep] int32 (ascending).

  Score per (layer, row, kv head, channel c): mean over the last
  `window_size` unmasked queries of q_c^2, averaged over the query heads
  of the kv head, times the mean over the valid keys of k_c^2; the
  `n_keep` highest-scoring channels are kept (the lowest
  head_dim - n_keep are pruned, as kvpress' topk(largest=False)).

  Args:
    q: [L, B, T, N, H] queries after RoPE; q_mask [B, T].
    k: [L, B, K, S, H] keys; valid [L, B, K, S].
  """
  L, B, T, N, H = q.shape
  K = k.shape[2]
  w = min(window_size, T)
  key = jnp.where(q_mask, jnp.arange(T), -1)
  idx = jnp.sort(jnp.argsort(key, axis=1, stable=True)[:, -w:], axis=1)
  live = jnp.take_along_axis(q_mask, idx, axis=1)  # [B, w]
  qw = jnp.take_along_axis(q, idx[None, :, :, None, None], axis=2)
  qw = qw.astype(jnp.float32) ** 2 * live[None, :, :, None, None]
  n_q = jnp.maximum(jnp.sum(live, axis=1), 1)  # [B]
  qn = jnp.sum(qw, axis=2) / n_q[None, :, None, None]  # [L, B, N, H]
  qn = qn.reshape(L, B, K, N // K, H).mean(3)  # [L, B, K, H]
  kf = jnp.where(valid[..., None], k.astype(jnp.float32) ** 2, 0.0)
  n_k = jnp.maximum(jnp.sum(valid, axis=-1), 1)[..., None]
  kn = jnp.sum(kf, axis=3) / n_k  # [L, B, K, H]
  score = qn * kn
  # the n_keep best (ties: the lower channel), as the complement of the
  # lowest head_dim - n_keep
  order = jnp.argsort(-score, axis=-1, stable=True)[..., :n_keep]
  return jnp.sort(order, axis=-1).astype(jnp.int32)


@base.by_value
def think(
  key_channel_compression_ratio: float = 0.0, window_size: int = 32
) -> base.KVTransform:
  """ThinK (arXiv 2407.21018; kvpress `ThinKPress`): prune the key channels
  with the smallest query-key magnitude, and store only the others.

  Per (layer, row, kv head), channel c scores mean_window(q_c^2) (the last
  `window_size` prompt queries, averaged over the query heads of the kv
  head) times mean_keys(k_c^2); int(head_dim * ratio) lowest channels are
  pruned (`think_channels`). Values are untouched.

  Memory is saved for real, where kvpress zeroes the channels and keeps
  the full shape: keys become a `CodedKV` of `think_codec` whose per-entry
  leaf has head_dim - n_pruned channels (in the cache's dtype) plus the
  kept-channel indices [L, B, K, kept] int32 as a shared leaf; `kv_bytes`
  counts those arrays. Attention computes q.k on the kept channels
  (`Codec.scores`), which equals attention over the zeroed keys, on every
  backend: reference, XLA, and the Pallas kernels (`ThinkTile`: the
  kept channels are a plain tile, the query is gathered once outside the
  kernel). `bits` states 16-bit entries on the kept channels (the dtype is
  not known to it); `kv_bytes` counts the real arrays.

  Further differences from kvpress, by design:
  - tokens written after compression (question, decode) are stored on the
    same kept channels (kvpress appends them with every channel: its cache
    is dense);
  - a chain places it after an eviction policy (`chain(snapkv(0.5),
    think(0.5))`, kvpress' ComposedPress). A per-entry codec may follow
    (`chain(think(0.5), fp8())`): it stores the kept channels
    (`pruned_codec`, built for head_dim - n_pruned channels, so an int
    codec's group_size must divide that); codecs with shared leaves
    (rotations, bases) or a residual window (KIVI) are refused after it.
  - the ratio counts key channels: the stored payload shrinks by
    ratio / 2 (kvpress' `compression_ratio` property reports the same).

  Args:
    key_channel_compression_ratio: fraction of key channels removed, in
      [0, 1).
    window_size: observed queries (>= 1).

  Raises:
    ValueError: arguments out of range; `base.Degenerate` at trace time
      when int(head_dim * ratio) == 0 (nothing would be pruned).
  """
  base.check_ratio(
    key_channel_compression_ratio, "key_channel_compression_ratio"
  )
  base.check_int(window_size, "window_size", 1)
  ratio = float(key_channel_compression_ratio)

  def apply(cache, state, ctx):
    if ctx.phase != "prefill":  # new keys are encoded as they are written
      return cache, state
    k = _float_payload(cache.k, "think")
    H = k.shape[-1]
    n_pruned = int(H * ratio)
    if n_pruned == 0:
      raise base.Degenerate(
        f"think: key_channel_compression_ratio={ratio} prunes "
        f"int({H} * {ratio}) = 0 of the head_dim={H} channels."
      )
    kept = H - n_pruned
    live = base.live_bound(cache, ctx)
    if cache.capacity - live < ctx.reserve:  # grow to honour the reserve
      cache, _ = base.compact(
        cache, cache.valid, live + ctx.reserve + ctx.decode_reserve
      )
      k = cache.k
    ch = think_channels(ctx.q, ctx.q_mask, k, cache.valid, window_size, kept)
    codec = think_codec(H, kept)
    enc = jax.vmap(codec.encode)(k, {"channels": ch})
    enc = {"kept": enc["kept"].astype(k.dtype)}
    return cache._replace(k=CodedKV(enc, {"channels": ch}, codec)), state

  def bits(head_dim):
    kept = head_dim - int(head_dim * ratio)
    return (16 * kept / head_dim, None)

  return base.KVTransform(
    init=lambda cache: (),
    apply=apply,
    keeps=lambda live: live,
    needs=("q",),
    bits=bits,
    name="think",
  )


# ----------------------------------------------------------------------------
# CaM.


class CAMState(NamedTuple):
  """State of `cam`.

  Attributes:
    budget: [B] int32 entries each row keeps per (layer, kv head).
    attn: [L, B, K, S] float32 attention accumulated by each slot's entry
      since it entered the cache (each pass's last query, averaged over the
      query heads of the kv head; moves with its entry on compaction).
    steps: [B] int32 forward passes since the row's last compression.
  """

  budget: Array
  attn: Array
  steps: Array


def cam_merge(
  scores: Array,
  keep: Array,
  valid: Array,
  pos: Array,
  attn: Array,
  v: Array,
  k_merge: Array,
  merge_budget: int,
  draw: Array | None,
) -> Array:
  """CaM's merge of one (layer, row): values [K, S, H] float32 after the
  evicted entries chosen for merging are folded into the kept entries that
  follow them.

  Of the evicted slots (valid, not `keep`), the `k_merge` highest `scores`
  (ties: the later position first) merge. Merge token m's window is the
  `merge_budget` kept entries right after it in position order (fewer at
  the end: a = their count). Per kv head h, p = attn[h, m] / mean of attn
  over the window, clamped to [0, 1] (0/0 -> 0, x/0 -> 1); the mask is a
  Bernoulli(p) draw (`draw` [K, S] uniforms: mask = draw < p) or p itself
  (`draw` None: the expected merge); each window target gains
  v[h, m] * mask / a.

  Args:
    scores: [S] the scorer's scores averaged over kv heads.
    keep, valid: [S] bool; pos: [S] int positions (one set for all heads).
    attn: [K, S] accumulated attention; v: [K, S, H].
    k_merge: [] int, how many evicted entries merge.
  """
  S = scores.shape[0]
  evicted = valid & ~keep
  # rank of each evicted slot: score descending, later position first
  by_pos = jnp.argsort(-jnp.where(evicted, pos, -1), stable=True)
  s_sorted = jnp.where(evicted, scores, -jnp.inf)[by_pos]
  order = by_pos[jnp.argsort(-s_sorted, stable=True)]
  rank = (
    jnp.zeros((S,), jnp.int32).at[order].set(jnp.arange(S, dtype=jnp.int32))
  )
  merge = evicted & (rank < k_merge)
  kept_pos = jnp.sort(jnp.where(keep, pos, jnp.iinfo(jnp.int32).max))
  n_kept = jnp.sum(keep)
  start = jnp.searchsorted(kept_pos, pos, side="right")  # [S]
  kept_rank = jnp.searchsorted(kept_pos, pos, side="left")  # [S]
  window = (
    merge[:, None]
    & keep[None, :]
    & (kept_rank[None, :] >= start[:, None])
    & (kept_rank[None, :] < start[:, None] + merge_budget)
  )  # [S(merge), S(target)]
  actual = jnp.clip(n_kept - start, 0, merge_budget)  # [S]
  wf = window.astype(jnp.float32)
  mean = jnp.einsum("mt,kt->km", wf, attn) / jnp.maximum(actual, 1)
  prob = attn / mean
  prob = jnp.where(jnp.isnan(prob), 0.0, jnp.where(jnp.isinf(prob), 1.0, prob))
  prob = jnp.clip(prob, 0.0, 1.0)
  mask = prob if draw is None else (draw < prob).astype(jnp.float32)
  scale = jnp.where(actual > 0, mask / jnp.maximum(actual, 1), 0.0)
  scale = jnp.where(merge[None, :], scale, 0.0)  # [K, S(merge)]
  return v + jnp.einsum("mt,km,kmh->kth", wf, scale, v)


@base.by_value
def cam(
  scorer: Any = "knorm",
  compression_interval: int = 512,
  target_size: int | None = 2048,
  merge_budget: int = 32,
  ratio: float | None = None,
  sample: bool = True,
  seed: int = 0,
) -> base.KVTransform:
  """CaM, cache merging (OpenReview LCTmppB165; kvpress `CAMPress`).

  Every `compression_interval` forward passes, a row holding more than its
  budget evicts down to it, the same entries for every kv head (the
  scorer's scores averaged over kv heads); of the evicted, the k highest
  scoring (k = passes since the last compression) have their values
  merged into the `merge_budget` kept entries that follow them, with
  probability min(1, A_m / mean A_window) (`cam_merge`, A the attention
  accumulated since each entry arrived). Compaction is real
  (`base.compact` into budget + headroom slots); the merged values are what
  is stored.

  Budget: `target_size` entries per (layer, row, kv head) (kvpress'
  argument, default 2048) or a `ratio` of the prompt removed (pass
  target_size=None); each row's decode budget is what it keeps at prefill,
  as in kvjax's other decode-time policies, so a prompt shorter than
  target_size keeps its own length (kvpress lets the cache grow to
  target_size; a static capacity cannot).

  Differs from kvpress, by design:
  - kvjax also compresses at prefill (a prompt longer than the budget):
    this is kvpress' compression of a pass with q_len >= target_size,
    k = 1 merge, the attention of the prompt's last query; kvpress runs
    CAMPress only after prefilling (its context prefill is not
    compressed and saves nothing until decode).
  - the Bernoulli draw uses jax.random (key `seed` folded with the decode
    step, one uniform per layer, row, head and slot), not torch's;
    `sample=False` merges with the expected mask p instead (deterministic; the parity test patches
    kvpress' draw the same way).
  - the scorer is a kvjax `Scorer` (or its name, `policies.scorer_by_name`;
    kvpress has no default base press, kvjax uses knorm); it is evaluated
    on the whole cache at the compression step (kvpress passes a buffer of
    recent hidden states).
  - each kv head merges within its own slot layout (CaM keeps the same
    entries per head, but a head-variable policy before it may not).

  Args:
    scorer: a `policies.Scorer` or its name.
    compression_interval: passes between compressions (>= 1; 1 is the
      paper's per-step CaM). The cache keeps that many slots of headroom
      above the budget, so with an interval above 1 the fullest row has
      `reserve + compression_interval` free slots after prefill (the
      reserve contract's decode-time headroom, rounded up as for KIVI's
      window).
    target_size: entries kept per head (>= 1), or None with `ratio`.
    merge_budget: kept neighbours each merged value is spread over (>= 1).
    ratio: fraction of the prompt removed, in [0, 1), or None.
    sample: Bernoulli merge decisions (True) or expected ones (False).
    seed: the draws' PRNG seed.
  """
  scorer = policies.resolve_scorer(scorer, "cam")
  if (ratio is None) == (target_size is None):
    raise ValueError(
      "cam takes exactly one of target_size (entries kept per head; "
      "kvpress' default 2048) or ratio (pass target_size=None); got "
      f"target_size={target_size!r}, ratio={ratio!r}."
    )
  base.check_budget(ratio, target_size)
  base.check_int(compression_interval, "compression_interval", 1)
  base.check_int(merge_budget, "merge_budget", 1)
  if not isinstance(sample, bool):
    raise TypeError(f"sample must be a bool, got {sample!r}.")
  base.check_int(seed, "seed", 0)
  needs = tuple(sorted(set(scorer.needs) | {"q", "attn_probs"}))

  def init(cache):
    B = cache.pos.shape[1]
    return CAMState(
      jnp.zeros((B,), jnp.int32),
      jnp.zeros(cache.pos.shape, jnp.float32),
      jnp.zeros((B,), jnp.int32),
    )

  def last_attention(cache, ctx):
    """[L, B, K, S] attention of each row's last query of this pass."""
    if ctx.phase == "decode" and ctx.attn_probs is not None:
      probs = ctx.attn_probs[:, :, :, -1]  # [L, B, N, S]
    else:
      probs = policies.window_attention(cache, ctx, 1)[0][:, :, :, 0]
    return policies._group_mean(probs, cache.pos.shape[2])  # pylint: disable=protected-access

  def compress(cache, state, ctx, n, go, extra):
    """Evicts rows `go` to n [L, B, K] entries with CaM's merge."""
    v = cache.v
    if isinstance(v, CodedKV) and v.codec.encode is not None:
      vf = v.decode_layers()  # a per-entry codec after cam (chain)
    else:
      vf = _float_payload(v, "cam").astype(jnp.float32)
    scores = scorer.score(cache, ctx, **extra).astype(jnp.float32)
    L, B, K, S = cache.pos.shape
    mean = jnp.mean(jnp.where(cache.valid, scores, 0.0), axis=2)  # [L, B, S]
    mean = jnp.broadcast_to(mean[:, :, None], scores.shape)
    live = base.live_counts(cache)
    n = jnp.where(go[None, :, None], n, live)
    keep = base.keep_top(mean, n, cache.valid)
    k_merge = jnp.broadcast_to(state.steps[None], (L, B))
    if sample:
      key = jax.random.fold_in(jax.random.key(seed), ctx.step)
      draw = jax.random.uniform(key, (L, B, K, S))
    else:
      draw = jnp.zeros((L, B, K, S), jnp.float32)  # unused

    def one(sc, kp, va, ps, at, vv, km, dr):
      # Each kv head with its own slot layout (after a head-variable
      # policy the heads' kept entries differ).
      def head(kp1, va1, ps1, at1, vv1, dr1):
        return cam_merge(
          sc,
          kp1,
          va1,
          ps1,
          at1[None],
          vv1[None],
          km,
          merge_budget,
          dr1[None] if sample else None,
        )[0]

      return jax.vmap(head)(kp, va, ps, at, vv, dr)

    merged = jax.lax.map(
      lambda xs: jax.vmap(one)(*xs),
      (
        mean[:, :, 0],
        keep,
        cache.valid,
        cache.pos,
        state.attn,
        vf,
        k_merge,
        draw,
      ),
    )  # [L, B, K, S, H]
    if isinstance(v, CodedKV):  # re-encode the merged entries only
      enc = jax.vmap(v.codec.encode)(merged, v.shared)
      changed = jnp.any(merged != vf, axis=-1)[..., None]  # [L, B, K, S, 1]
      slots = {
        name: jnp.where(changed, enc[name].astype(leaf.dtype), leaf)
        for name, leaf in v.slots.items()
      }
      return cache._replace(v=CodedKV(slots, v.shared, v.codec)), keep
    cache = cache._replace(v=merged.astype(v.dtype))
    return cache, keep

  def apply(cache, state, ctx, **extra):
    L, B, K, S = cache.pos.shape
    attn = state.attn + jnp.where(cache.valid, last_attention(cache, ctx), 0.0)
    steps = state.steps + 1
    if ctx.phase == "prefill":
      live = base.live_counts(cache)
      n = base.n_keep(live, ratio, target_size, cache.capacity)
      budget = jnp.max(n, axis=(0, 2))
      cap = (
        base.static_keep(base.live_bound(cache, ctx), ratio, target_size)
        + ctx.reserve
        + compression_interval
      )
      go = jnp.max(live, axis=(0, 2)) > budget
      state = CAMState(budget, attn, steps)
      merged, keep = compress(cache, state, ctx, n, go, extra)
      out, idx = base.compact(merged, keep, cap)
      attn = jnp.where(out.valid, jnp.take_along_axis(attn, idx, -1), 0.0)
      return out, CAMState(budget, attn, jnp.where(go, 0, steps))
    live = jnp.max(base.live_counts(cache), axis=(0, 2))  # [B]
    go = (steps >= compression_interval) & (live > state.budget)
    state = CAMState(state.budget, attn, steps)

    def run(cache):
      n = jnp.broadcast_to(state.budget[None, :, None], (L, B, K))
      merged, keep = compress(cache, state, ctx, n, go, extra)
      out, idx = base.compact(merged, keep, cache.capacity)
      a = jnp.where(out.valid, jnp.take_along_axis(attn, idx, -1), 0.0)
      return out, a

    cache, attn = jax.lax.cond(jnp.any(go), run, lambda c: (c, attn), cache)
    return cache, CAMState(state.budget, attn, jnp.where(go, 0, steps))

  return base.KVTransform(
    init=init,
    apply=apply,
    keeps=lambda live: base.static_keep(live, ratio, target_size),
    needs=needs,
    extras=scorer.extras,
    every=1,
    name="cam",
    bounded=True,
  )


# ----------------------------------------------------------------------------
# Registry hook.


def _streaming(ratio: float) -> base.KVTransform:
  return policies.scored_policy(
    policies.streaming_llm_scorer(4), ratio, name="streaming_llm"
  )


METHODS: Mapping[str, Callable[[float], base.KVTransform]] = (
  types.MappingProxyType(
    {
      "merging": lambda ratio: merging(policies.snapkv(ratio, window_size=32)),
      "key_rerotation": lambda ratio: key_rerotation(_streaming(ratio)),
      "cam": lambda ratio: cam(
        "streaming_llm", compression_interval=1, target_size=None, ratio=ratio
      ),  # per-step CaM (kvpress: compression_interval=1 is the original)
      # `ratio` is the share of key channels removed (payload -ratio/2).
      "think": lambda ratio: think(ratio, window_size=32),
    }
  )
)
