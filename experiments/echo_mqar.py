"""Echo memory vs a same-bytes linear memory vs kvjax-tiny on MQAR-32.

Trains a small `kvjax.echo` model (every layer reads a fixed-size Echo
state, or, with `layer_memories`, some layers attend over a KV cache or a
sliding-window ring) on MQAR with a curriculum of key-value pairs, then
scores MQAR with 32 pairs at long contexts (the pairs open the sequence, filler up to the
context length, then the 32 queries), with the bytes of the state each row
carries. The same job trains the linear-attention baseline whose state has
the same bytes, and scores kvjax-tiny (the shipped KV-cache model) on the
same rows with its KV-cache bytes. Each run appends one JSON row per
(model, context) to <out_dir>/echo_mqar.jsonl (a rerun skips finished rows
and reuses trained params from --config.workdir), then rewrites
echo_mqar.md and echo_mqar.png from every row there.

  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.memory=linear
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.memory=kvjax-tiny

The rows of results/memories/echo_mqar.md came from these (2-core CPU):

  # echo r=16 (K = 2; stopped by the 20 min cap at step 661)
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.max_minutes=20 --config.max_steps=800 --config.warmup_steps=20
  # echo r=16 K0 (ridge recall)
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.max_minutes=14 --config.max_steps=800 --config.warmup_steps=20 \
      --config.power_k=0 --config.tag=K0
  # linear r=49 (3,000 steps) and linear r=49 800steps
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.memory=linear
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.memory=linear --config.max_steps=800 \
      --config.warmup_steps=20 --config.tag=800steps
  # kvjax-tiny (no training)
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.memory=kvjax-tiny
  # hybrids: attn W=64 + echo r=16 K0, attn W=64 + echo r=16 (K = 2),
  # attn full + echo r=16 K0 (2,000 steps each)
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.layer_memories=attention,echo --config.attention_window=64 \
      --config.power_k=0 --config.tag=K0 --config.max_minutes=14 \
      --config.max_steps=2000 --config.warmup_steps=20
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.layer_memories=attention,echo --config.attention_window=64 \
      --config.power_k=2 --config.max_minutes=14 --config.max_steps=2000 \
      --config.warmup_steps=20
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.layer_memories=attention,echo --config.attention_window=0 \
      --config.power_k=0 --config.tag=K0 --config.max_minutes=14 \
      --config.max_steps=2000 --config.warmup_steps=20
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, logging
from ml_collections import config_flags

from experiments import plotting
from kvjax import echo, pretrained
from kvjax.cache import init_cache, kv_bytes
from kvjax.tasks import generators, scoring
from kvjax.train import evaluate, losses

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/configs/echo_mqar.py", lock_config=True
)


def echo_config(cfg) -> echo.EchoConfig:
  """The EchoConfig of the job (the linear rank matched to Echo's bytes;
  `cfg.layer_memories` "attention,echo" makes a hybrid)."""
  kinds = tuple(k.strip() for k in cfg.layer_memories.split(",") if k.strip())
  c = echo.EchoConfig(
    memory="echo" if kinds else cfg.memory,
    layer_memories=kinds or None,
    attention_window=cfg.attention_window or None,
    d_model=cfg.d_model,
    num_layers=cfg.num_layers,
    num_heads=cfg.num_heads,
    rank=cfg.rank,
    value_dim=cfg.value_dim,
    mlp_dim=cfg.mlp_dim,
    power_k=cfg.power_k,
    power_iters=cfg.power_iters,
    chunk_size=cfg.chunk_size,
  )
  if cfg.memory == "linear" and not kinds:
    c = c.replace(memory="linear", rank=echo.matched_linear_rank(c))
  return c


def model_name(config: echo.EchoConfig, tag: str) -> tuple[str, str]:
  """The table's model and state names: "echo r=16 K0" for a one-kind
  model, "attn W=64 + echo r=16 K0" for a hybrid (layer order)."""
  parts, states = [], []
  for kind in dict.fromkeys(config.kinds):
    if kind == "attention":
      W = config.attention_window
      parts.append(f"attn W={W}" if W else "attn full")
      states.append(f"KV ring {W}" if W else "KV cache")
    else:
      parts.append(f"{kind} r={config.rank}")
      states.append(f"{kind} state")
  name = " + ".join(parts)
  return (f"{name} {tag}" if tag else name), " + ".join(states)


def init_state(config: echo.EchoConfig, batch_size: int, num_tokens: int):
  """A fresh state; a full-attention layer's cache holds num_tokens."""
  capacity = num_tokens if config.full_attention else None
  return echo.init_state(config, batch_size, capacity)


def train(cfg, config: echo.EchoConfig, path: str):
  """Trains with adamw until max_steps or max_minutes; saves to `path`."""
  if os.path.exists(path):
    with np.load(path) as f:
      leaves = [jnp.asarray(f[f"leaf{i}"]) for i in range(len(f.files) - 1)]
      record = json.loads(str(f["record"]))
    treedef = jax.tree.structure(echo.init_params(config, jax.random.key(0)))
    logging.info("reusing trained params %s", path)
    return jax.tree.unflatten(treedef, leaves), record
  params = echo.init_params(config, jax.random.PRNGKey(cfg.seed))
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, cfg.learning_rate, cfg.warmup_steps, cfg.max_steps, 0.1
  )
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, tokens, weights):
    def loss_fn(params):
      B, T = tokens.shape
      state = init_state(config, B, T - 1)
      logits, _ = echo.forward(params, tokens[:, :-1], state, config=config)
      return losses.weighted_cross_entropy(logits, tokens[:, 1:], weights)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  pairs, contexts = tuple(cfg.pairs_schedule), tuple(cfg.context_schedule)
  if len(pairs) != len(contexts):
    raise ValueError(
      f"pairs_schedule {pairs} and context_schedule {contexts} must have "
      "the same length."
    )
  start, steps_per_pairs = time.time(), {}
  budget = 60.0 * cfg.max_minutes
  for i in range(cfg.max_steps):
    elapsed = time.time() - start
    if elapsed > budget:
      break
    phase = min(len(pairs) * i // cfg.max_steps, len(pairs) - 1)
    num_pairs = pairs[phase]
    batch = generators.mqar(
      cfg.batch_size,
      seed=(cfg.seed, i),
      context_len=contexts[phase],
      num_pairs=num_pairs,
    )
    params, opt_state, m = step(
      params,
      opt_state,
      jnp.asarray(batch.tokens),
      jnp.asarray(batch.loss_mask[:, 1:]),
    )
    steps_per_pairs[num_pairs] = steps_per_pairs.get(num_pairs, 0) + 1
    if i % cfg.log_every == 0:
      logging.info(
        "%s step %d pairs %d loss %.3f acc %.3f (%.0f s)",
        "+".join(config.kinds),
        i,
        num_pairs,
        float(m["loss"]),
        float(m["accuracy"]),
        time.time() - start,
      )
  record = {
    "steps": i,
    "train_seconds": round(time.time() - start, 1),
    "steps_per_pairs": {str(k): v for k, v in steps_per_pairs.items()},
    "final_train_accuracy": float(m["accuracy"]),
    "final_train_loss": float(m["loss"]),
  }
  leaves = jax.tree.leaves(params)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(
    path,
    record=json.dumps(record),
    **{f"leaf{i}": np.asarray(x) for i, x in enumerate(leaves)},
  )
  return params, record


def eval_rows(cfg, context_len: int):
  """The held-out MQAR batches of one context (as `evaluate.evaluate_task`
  draws them, so kvjax-tiny sees the same rows)."""
  done, i = 0, 0
  while done < cfg.eval_examples:
    n = min(cfg.eval_batch_size, cfg.eval_examples - done)
    batch = generators.make_batch(
      "mqar",
      cfg.eval_batch_size,
      seed=(cfg.eval_seed, i),
      context_len=context_len,
      num_pairs=cfg.eval_pairs,
    )
    yield generators.TaskBatch(*(f[:n] for f in batch))
    done, i = done + n, i + 1


def evaluate_echo(cfg, params, config, context_len: int) -> dict:
  """Prefill the context into a fresh state, answer the question from it."""
  correct = total = 0
  state_size = None
  for batch in eval_rows(cfg, context_len):
    B = batch.batch_size
    tokens = jnp.asarray(batch.tokens)
    _, state = echo.forward(
      params,
      tokens[:, :context_len],
      init_state(config, B, tokens.shape[1]),
      config=config,
      chunk_size=cfg.eval_chunk_size,
    )
    state_size = echo.state_bytes(state) // B
    logits, _ = echo.forward(
      params,
      tokens[:, context_len:],
      state,
      config=config,
      chunk_size=cfg.eval_chunk_size,
    )
    predicted, _ = scoring.predictions_from_logits(
      batch, logits, offset=context_len
    )
    valid = batch.answer_positions >= 0
    correct += int(np.sum((predicted == batch.answers) & valid))
    total += int(np.sum(valid))
  return {"accuracy": correct / total, "bytes_per_row": state_size}


def evaluate_tiny(cfg, context_len: int) -> dict:
  """kvjax-tiny on the same rows, and the bytes of its KV cache per row."""
  config, params = pretrained.load("kvjax-tiny")
  score = evaluate.evaluate_task(
    params,
    config,
    "mqar",
    context_len=context_len,
    num_examples=cfg.eval_examples,
    seed=cfg.eval_seed,
    batch_size=cfg.eval_batch_size,
    num_pairs=cfg.eval_pairs,
  )
  T = context_len + 1 + 2 * cfg.eval_pairs
  return {
    "accuracy": float(score.accuracy),
    "bytes_per_row": int(kv_bytes(init_cache(config, 1, T))),
  }


def read_rows(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


READING_MARKER = "<!-- reading: kept across regenerations -->"


def _training_lines(rows: list[dict]) -> str:
  """One line per model: how it was trained (from the rows' records)."""
  out, seen = (
    ["", "Training (optax adamw, MQAR rows, curriculum by steps):", ""],
    set(),
  )
  for r in rows:
    if r["model"] in seen:
      continue
    seen.add(r["model"])
    t = r.get("train", {})
    if "steps" in t:
      out.append(
        f"- {r['model']}: {t['steps']} steps in {t['train_seconds']} s, "
        f"steps per num_pairs {t['steps_per_pairs']}, last-batch train "
        f"accuracy {t['final_train_accuracy']:.3f}; {t.get('config', '')}"
      )
    else:
      out.append(f"- {r['model']}: {t.get('trained', '')}")
  return "\n".join(out) + "\n"


def write_report(rows: list[dict], out_dir: str) -> None:
  """echo_mqar.md (accuracy and bytes per context) and echo_mqar.png."""
  models = sorted({r["model"] for r in rows})
  contexts = sorted({r["context_len"] for r in rows})
  cell = {(r["model"], r["context_len"]): r for r in rows}
  lines = [
    "| model | state | "
    + " | ".join(f"acc @{c}" for c in contexts)
    + " | "
    + " | ".join(f"bytes @{c}" for c in contexts)
    + " |",
    "|---|---|" + "---|" * (2 * len(contexts)),
  ]
  for model in models:
    accs, sizes = [], []
    for c in contexts:
      r = cell.get((model, c))
      accs.append("-" if r is None else f"{r['accuracy']:.3f}")
      sizes.append("-" if r is None else f"{r['bytes_per_row']:,}")
    kind = next(r["state"] for r in rows if r["model"] == model)
    lines.append(f"| {model} | {kind} | " + " | ".join(accs + sizes) + " |")
  md = os.path.join(out_dir, "echo_mqar.md")
  # Hand-written text after READING_MARKER survives a regeneration.
  reading = ""
  if os.path.exists(md):
    with open(md) as f:
      text = f.read()
    if READING_MARKER in text:
      reading = text[text.index(READING_MARKER) :]
  with open(md, "w") as f:
    f.write(
      "# MQAR-32 accuracy and per-row memory bytes by context length\n\n"
      "Rows: `kvjax.tasks.mqar`, 32 pairs (prefix placement), held-out "
      "seed; written by `experiments/echo_mqar.py` (the table is "
      "regenerated from echo_mqar.jsonl on every run).\n\n"
    )
    f.write("\n".join(lines) + "\n")
    f.write(_training_lines(rows))
    if reading:
      f.write("\n" + reading)
  plt = plotting.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  col = plotting.colors(models)
  for model in models:
    cs = [c for c in contexts if (model, c) in cell]
    ax1.plot(
      cs,
      [cell[model, c]["accuracy"] for c in cs],
      "o-",
      label=model,
      color=col[model],
    )
    ax2.plot(
      cs,
      [cell[model, c]["bytes_per_row"] for c in cs],
      "o-",
      label=model,
      color=col[model],
    )
  for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
  ax1.set_ylabel("MQAR-32 accuracy")
  ax1.set_ylim(-0.02, 1.02)
  ax2.set_yscale("log")
  ax2.set_ylabel("memory bytes per row")
  plotting.grid(ax1, ax2)
  plotting.save(fig, os.path.join(out_dir, "echo_mqar.png"))


def main(argv):
  del argv
  cfg = _CONFIG.value
  os.makedirs(cfg.out_dir, exist_ok=True)
  path = os.path.join(cfg.out_dir, "echo_mqar.jsonl")
  done = {(r["model"], r["context_len"]) for r in read_rows(path)}
  if cfg.memory == "kvjax-tiny":
    name, state, run = "kvjax-tiny", "KV cache", evaluate_tiny
    record = {"trained": "shipped (kvjax/assets/kvjax-tiny)"}
  else:
    config = echo_config(cfg)
    name, state = model_name(config, cfg.tag)
    file = "".join(ch if ch.isalnum() else "_" for ch in name) + ".npz"
    params, record = train(cfg, config, os.path.join(cfg.workdir, file))
    run = lambda cfg, c: evaluate_echo(cfg, params, config, c)
    record = {**record, "config": str(config)}
  for context_len in cfg.eval_context_lens:
    if (name, context_len) in done:
      logging.info("%s @%d already in %s", name, context_len, path)
      continue
    start = time.time()
    row = run(cfg, context_len)
    row.update(
      model=name,
      state=state,
      context_len=context_len,
      num_examples=cfg.eval_examples,
      eval_seconds=round(time.time() - start, 1),
      train=record,
    )
    logging.info("%s @%d: %s", name, context_len, row)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")
  write_report(read_rows(path), cfg.out_dir)


if __name__ == "__main__":
  app.run(main)
