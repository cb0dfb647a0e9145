"""Range-search decode attention vs kvjax's blockwise dense path and dense
jnp, side by side in one run (CPU).

  python -m benchmarks.range_search_bench                  # 8k..64k, ~5 min
  python -m benchmarks.range_search_bench --lengths=8192 --repeats=3
  python -m benchmarks.range_search_bench --quick          # smoke test
  python -m benchmarks.range_search_bench --heads=2 --kv_heads=2 --append

One decode step (T = 1), batch 1, N query heads over K kv heads, float32.
Per cache length S and budget:
  dense jnp: `kvjax.attention.reference_attention` (materializes the
    [N, S] logits), jitted.
  xla blockwise: `kvjax.attention.attention(..., backend="xla")`, the
    blockwise online-softmax engine kvjax runs on CPU, jitted.
  range search: `range_search_attention(..., index=prebuilt,
    capacity=M)` (the fast path) with tau from the 256-key reservoir at the
    budget, `--buffer` recent slots always read. The index is built once
    per S (its time is the `build s` column, jitted, after compilation).
    Two layouts: "row gather" reads the candidate clusters' keys row by
    row from the original layout; "block gather" stores K and V in the
    index's cluster order (`cluster_order`, timed as the layout column)
    and reads whole blocks of `--block` clusters as contiguous rows.
    The capacity (clusters, or blocks) is `--capacity_margin` times the
    largest candidate count seen on `--calibration` calibration queries
    (clusters: rounded up to 64); every timed and evaluated query that does
    not fit falls back to the dense computation (exact) and is counted.
Times are medians of `--repeats` calls after a warm-up (compilation);
every call is blocked on. Fractions (retrieved, scored, mass, fallbacks)
are over `--queries` fresh decode queries.

Keys ("clustered, outlier channels"): per kv head, 64 topic centers drawn
N(0, diag(spec^2)) with spec_i = 1 / sqrt(1 + i / 4) in a shuffled channel
order and 4 outlier channels x 8, a shared offset 2 * N(0, spec^2) (keys
have a common mean direction), tokens in runs of 64 sharing a topic, key =
offset + center + 0.3 * spec * noise. Queries: a random topic's center +
0.3 * N(0, 1). Values N(0, 1). This is a stand-in for real keys (low
effective rank, clustered, outlier channels), not measured model keys.

Columns: scored = keys whose scores were computed (members of the
gathered clusters or blocks, union over a kv head's G query heads) / keys
indexed; recall = retrieved / brute-force |{k : q.k >= tau}| over the
indexed region (must be 1.000); mass = the dense softmax mass on the keys
read (retrieved + buffer), i.e. how much of dense attention survives the
threshold; index overhead = index bytes / (K + V bytes) at float32 and at
bfloat16 K/V (the index itself is float32 centers/radii + int32 maps).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import median_time
from kvjax import attention
from kvjax.compress import range_search as rs

_LENGTHS = flags.DEFINE_list(
  "lengths", ["8192", "16384", "32768", "65536"], "Cache lengths S."
)
_BUDGETS = flags.DEFINE_list(
  "budgets", ["0.05", "0.1", "0.2"], "Reservoir budgets (tau quantiles)."
)
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads N.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "KV heads K.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim H.")
_SUBSPACES = flags.DEFINE_integer("subspaces", 4, "Index subspaces P.")
_GROUP = flags.DEFINE_integer("group", 4, "Keys per cluster.")
_BLOCK = flags.DEFINE_integer(
  "block", 16, "Clusters per block of the block-gather path."
)
_BUFFER = flags.DEFINE_integer("buffer", 256, "Recent slots always read.")
_MARGIN = flags.DEFINE_float(
  "capacity_margin", 1.25, "Capacity = margin x largest calibration count."
)
_CALIBRATION = flags.DEFINE_integer(
  "calibration", 8, "Calibration queries that set the capacity."
)
_QUERIES = flags.DEFINE_integer("queries", 16, "Evaluated decode queries.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median).")
_THREADS = flags.DEFINE_integer("threads", 2, "XLA CPU threads.")
_QUICK = flags.DEFINE_bool("quick", False, "S = 2048 only, 2 repeats.")
_OUT = flags.DEFINE_string(
  "out", "results/memories/range_search_speed", "Output prefix (.md)."
)
_JSONL = flags.DEFINE_string("jsonl", "", "Also write the rows here (JSONL).")
_APPEND = flags.DEFINE_bool(
  "append", False, "Append the report to the .md instead of replacing it."
)

_TOPICS = 64
_RUN = 64


def limit_threads(threads: int) -> None:
  """Gives XLA `threads` CPU threads (call before its backend starts)."""
  eigen = "true" if threads > 1 else "false"
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen="
    f"{eigen} intra_op_parallelism_threads={threads}"
  )


def make_data(S, K, H, seed=0):
  """(keys [1, K, S, H], values, topic centers [K, topics, H]) float32."""
  rng = np.random.default_rng(seed)
  spec = 1.0 / np.sqrt(1.0 + np.arange(H) / 4.0)
  rng.shuffle(spec)
  spec[rng.choice(H, 4, replace=False)] *= 8.0
  centers = rng.normal(size=(K, _TOPICS, H)) * spec
  offset = 2.0 * rng.normal(size=(K, 1, H)) * spec
  topic = rng.integers(0, _TOPICS, (K, S // _RUN + 1)).repeat(_RUN, -1)[:, :S]
  k = offset + np.take_along_axis(centers, topic[..., None], 1)
  k = k + 0.3 * spec * rng.normal(size=(K, S, H))
  v = rng.normal(size=(K, S, H))
  f = lambda x: jnp.asarray(x[None], jnp.float32)
  return f(k), f(v), centers


def make_queries(centers, n, N, seed):
  """[n, 1, 1, N, H] decode queries near random topic centers."""
  rng = np.random.default_rng(seed)
  K, topics, H = centers.shape
  G = N // K
  pick = rng.integers(0, topics, (n, K, G))
  q = centers[np.arange(K)[None, :, None], pick]  # [n, K, G, H]
  q = q + 0.3 * rng.normal(size=q.shape)
  return jnp.asarray(q.reshape(n, 1, 1, N, H), jnp.float32)


def _fmt(v, digits=2):
  return "—" if v is None else f"{v:.{digits}f}"


def _table(header, lines):
  return (
    ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    + ["| " + " | ".join(map(str, l)) + " |" for l in lines]
    + [""]
  )


def run_length(S, budgets, s):
  """Rows for one cache length."""
  K, N, H, R = s["K"], s["N"], s["H"], s["buffer"]
  k, v, centers = make_data(S, K, H, seed=S)
  valid = jnp.ones((1, K, S), bool)
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (1, K, S))
  q_pos = jnp.full((1, 1), S, jnp.int32)
  Sr = S - R
  # Arrays are arguments, never closed over (no large jit constants).
  dense_jit = jax.jit(
    lambda q, k, v: attention.reference_attention(
      q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid
    )
  )
  xla_jit = jax.jit(
    lambda q, k, v: attention.attention(
      q, k, v, q_pos=q_pos, k_pos=pos, k_valid=valid, backend="xla"
    )
  )
  dense_fn = lambda q: dense_jit(q, k, v)
  xla_fn = lambda q: xla_jit(q, k, v)
  build = jax.jit(
    lambda k: rs.build_index(k, subspaces=s["P"], group=s["group"])
  )
  kr = k[:, :, :Sr]
  t_build, index = median_time(
    lambda: jax.block_until_ready(build(kr)), max(1, s["repeats"] // 2)
  )
  C = index.num_clusters
  kv_bytes32 = 2 * k.size * 4
  ib = rs.index_bytes(index)
  queries = make_queries(centers, s["queries"], N, seed=S + 1)
  calib = make_queries(centers, s["calibration"], N, seed=S + 2)
  q0 = queries[0]
  t_dense, ref0 = median_time(
    lambda: jax.block_until_ready(dense_fn(q0)), s["repeats"]
  )
  t_xla, x0 = median_time(
    lambda: jax.block_until_ready(xla_fn(q0)), s["repeats"]
  )
  assert np.allclose(x0.out, ref0.out, atol=1e-4), "xla != reference"
  G = N // K

  qm_of = lambda q: jnp.moveaxis(q.reshape(1, 1, K, G, H), 1, 3).reshape(
    1, K, G, H
  )  # [1, 1, N, H] -> [1, K, G, H]
  blk = s["block"]
  layout = jax.jit(
    lambda x, index: jnp.concatenate(
      [rs.cluster_order(x[:, :, :Sr], index, blk), x[:, :, Sr:]], 2
    )
  )
  t_layout, (kc, vc) = median_time(
    lambda: jax.block_until_ready((layout(k, index), layout(v, index))),
    max(1, s["repeats"] // 2),
  )
  index_c = jax.jit(rs.in_cluster_order, static_argnums=1)(index, blk)
  nb = index_c.num_clusters // blk

  @jax.jit
  def counts_jit(q, tau, kr, index_c):
    """(candidate clusters [1, K], candidate blocks [1, K], brute-force
    hits [1, N]) of queries q [1, 1, N, H] at tau [1, N, 1]."""
    qm, t = qm_of(q), tau.reshape(1, K, G)[..., None]
    cand = jnp.any(rs.upper_bounds(qm, index_c) >= t, 2)  # [1, K, C']
    blocks = jnp.any(cand.reshape(1, K, nb, blk), -1)
    hits = rs.scores(qm, kr) >= t
    return jnp.sum(cand, -1), jnp.sum(blocks, -1), jnp.sum(hits, -1)

  taus_jit = jax.jit(
    lambda q, kr, index, budget: rs.reservoir_tau(
      qm_of(q), kr, index, budget
    ).reshape(1, N, 1),
    static_argnames=("budget",),
  )
  counts = lambda q, t: counts_jit(q, t, kr, index_c)
  fast_jit = jax.jit(
    rs.range_search_attention,
    static_argnames=("buffer", "budget", "capacity", "clustered", "block"),
  )
  mass_jit = jax.jit(
    lambda q, tau, probs, k: jnp.mean(
      jnp.sum(
        jnp.where(
          (rs.scores(qm_of(q), k) >= tau.reshape(1, K, G)[..., None])
          .at[..., Sr:]
          .set(True)
          .reshape(1, N, 1, S),
          probs,
          0.0,
        ),
        -1,
      )
    )
  )  # dense probability mass on the keys read (retrieved + buffer)

  rows = []
  for budget in budgets:
    tau_of = lambda q, b=budget: taus_jit(q, kr, index, budget=b)
    need = [counts(c, tau_of(c)) for c in calib]
    cap_rows = min(
      C, 64 * math.ceil(s["margin"] * max(int(n[0].max()) for n in need) / 64)
    )
    cap_blocks = min(
      nb, math.ceil(s["margin"] * max(int(n[1].max()) for n in need))
    )
    variants = {
      "rows": lambda q, c=cap_rows, b=budget: fast_jit(
        q, k, v, buffer=R, budget=b, index=index, capacity=c
      ),
      "blocks": lambda q, c=cap_blocks, b=budget: fast_jit(
        q,
        kc,
        vc,
        buffer=R,
        budget=b,
        index=index_c,
        capacity=c,
        clustered=True,
        block=blk,
      ),
    }
    row = {
      "S": S,
      "budget": budget,
      "clusters": C,
      "blocks": nb,
      "cap_rows": cap_rows,
      "cap_blocks": cap_blocks,
      "dense_ms": t_dense * 1e3,
      "xla_ms": t_xla * 1e3,
      "build_s": t_build,
      "layout_s": t_layout,
      "index_mb": ib / 2**20,
      "overhead_f32": ib / kv_bytes32,
      "overhead_bf16": ib / (kv_bytes32 / 2),
    }
    recall, mass = [], []
    for name, fn in variants.items():
      t, _ = median_time(lambda: jax.block_until_ready(fn(q0)), s["repeats"])
      row[name + "_ms"] = t * 1e3
      ret, scored, fb = [], [], 0
      for q in queries:
        out = fn(q)
        hits = counts(q, out.tau)[2]
        recall.append(
          float(np.sum(out.retrieved)) / max(float(np.sum(hits)), 1.0)
        )
        ret.append(float(np.mean(out.retrieved)) / Sr)
        scored.append(float(np.mean(out.scored)) / Sr)
        fb += int(np.sum(out.fallback))
        if name == "rows":
          mass.append(float(mass_jit(q, out.tau, dense_fn(q).probs, k)))
      row[name + "_scored"] = float(np.mean(scored))
      row[name + "_fallbacks"] = fb
      row["retrieved"] = float(np.mean(ret))
    row["fallback_of"] = len(queries) * K
    row["recall_min"] = float(np.min(recall))
    row["mass"] = float(np.mean(mass))
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def report(rows, s, header):
  md = [header, ""]
  md += ["### Decode time (ms per step, one query per head)", ""]
  md += _table(
    [
      "S",
      "budget",
      "dense jnp",
      "xla blockwise",
      "range, row gather",
      "range, block gather",
      "xla/row (>1: range faster)",
      "xla/block (>1: range faster)",
      "dense/block",
    ],
    [
      (
        r["S"],
        r["budget"],
        _fmt(r["dense_ms"]),
        _fmt(r["xla_ms"]),
        _fmt(r["rows_ms"]),
        _fmt(r["blocks_ms"]),
        _fmt(r["xla_ms"] / r["rows_ms"]),
        _fmt(r["xla_ms"] / r["blocks_ms"]),
        _fmt(r["dense_ms"] / r["blocks_ms"]),
      )
      for r in rows
    ],
  )
  md += ["### What was read", ""]
  md += _table(
    [
      "S",
      "budget",
      "retrieved",
      "scored (clusters)",
      f"scored (blocks of {s['block']} clusters)",
      "recall vs brute force (min)",
      "dense mass read",
      "fallbacks rows / blocks (of heads x queries)",
      "capacity: clusters / blocks",
    ],
    [
      (
        r["S"],
        r["budget"],
        _fmt(r["retrieved"], 3),
        _fmt(r["rows_scored"], 3),
        _fmt(r["blocks_scored"], 3),
        _fmt(r["recall_min"], 3),
        _fmt(r["mass"], 3),
        f"{r['rows_fallbacks']} / {r['blocks_fallbacks']} (of "
        f"{r['fallback_of']})",
        f"{r['cap_rows']} of {r['clusters']} / {r['cap_blocks']} of "
        f"{r['blocks']}",
      )
      for r in rows
    ],
  )
  md += ["### Index cost", ""]
  seen = {}
  for r in rows:
    seen.setdefault(r["S"], r)
  md += _table(
    [
      "S",
      "build s",
      "cluster-order layout of K, V s",
      "index MB",
      "index / KV bytes (f32 K, V)",
      "index / KV bytes (bf16 K, V)",
    ],
    [
      (
        r["S"],
        _fmt(r["build_s"]),
        _fmt(r["layout_s"]),
        _fmt(r["index_mb"], 1),
        _fmt(r["overhead_f32"], 3),
        _fmt(r["overhead_bf16"], 3),
      )
      for r in seen.values()
    ],
  )
  return "\n".join(md)


def main(argv):
  del argv
  limit_threads(_THREADS.value)
  lengths = sorted(int(x) for x in _LENGTHS.value)
  budgets = [float(b) for b in _BUDGETS.value]
  s = dict(
    K=_KV_HEADS.value,
    N=_HEADS.value,
    H=_HEAD_DIM.value,
    P=_SUBSPACES.value,
    group=_GROUP.value,
    block=_BLOCK.value,
    buffer=_BUFFER.value,
    margin=_MARGIN.value,
    calibration=_CALIBRATION.value,
    queries=_QUERIES.value,
    repeats=_REPEATS.value,
  )
  if _QUICK.value:
    lengths, s["repeats"], s["queries"] = [2048], 2, 4
  load_before = os.getloadavg()
  rows = []
  for S in lengths:
    rows += run_length(S, budgets, s)
  load = lambda l: "/".join(f"{x:.2f}" for x in l)
  header = (
    f"## Range-search decode attention, N={s['N']} query heads, "
    f"K={s['K']} kv heads\n\nBatch 1, H={s['H']} float32, subspaces {s['P']}, group {s['group']}, buffer "
    f"{s['buffer']}, reservoir 256; keys: clustered with outlier channels "
    "(see benchmarks/range_search_bench.py). Machine: "
    f"{platform.platform()}, {os.cpu_count()} CPUs, {_THREADS.value} XLA "
    f"thread(s), jax {jax.__version__}; load average before "
    f"{load(load_before)}, after {load(os.getloadavg())}. Median of "
    f"{s['repeats']} after compilation; fractions over {s['queries']} "
    "queries.\n\nCommand: `"
    + " ".join(["python -m benchmarks.range_search_bench", *sys.argv[1:]])
    + "`"
  )
  md = report(rows, s, header)
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  with open(_OUT.value + ".md", "a" if _APPEND.value else "w") as f:
    f.write(md + "\n")
  if _JSONL.value:
    with open(_JSONL.value, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  print(md)


if __name__ == "__main__":
  app.run(main)
