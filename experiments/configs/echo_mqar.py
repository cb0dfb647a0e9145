"""Config of the Echo-memory MQAR job (`experiments/echo_mqar.py`).

  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.memory=linear
  python -m experiments.echo_mqar --config=experiments/configs/echo_mqar.py \
      --config.memory=kvjax-tiny

`memory=linear` gets the rank whose state bytes match the Echo model's
(`kvjax.echo.matched_linear_rank` of the same config); `memory=kvjax-tiny`
trains nothing and evaluates the shipped model on the same rows.

Hybrids (`layer_memories`, one kind per layer): a sliding-window attention
layer (64 tokens, a fixed-size ring) under an Echo layer, K = 0 and K = 2,
and the same with full attention (its KV cache grows with the context);
the commands of every committed row are in experiments/echo_mqar.py's
docstring.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.memory = "echo"  # "echo", "linear" (same bytes) or "kvjax-tiny".
  c.workdir = "/tmp/echo_mqar"  # Trained params (<memory>.npz) go here.
  c.out_dir = "results/memories"  # echo_mqar.{jsonl,md,png}.
  c.tag = ""  # Appended to the model's name in the table (e.g. "2k steps").
  # Layer kinds, comma-separated, one per layer ("attention,echo"); "" =
  # every layer `memory`. Names the model "attn W=64 + echo r=16".
  c.layer_memories = ""
  c.attention_window = 0  # W of the attention layers; 0 = full attention.
  # Model (kvjax.echo.EchoConfig fields).
  c.d_model = 64  # D.
  c.num_layers = 2  # L (every layer a memory unless layer_memories).
  c.num_heads = 2  # N memory heads per layer.
  c.rank = 16  # r of Echo (the linear model's rank is matched in bytes).
  c.value_dim = 16  # P per head.
  c.mlp_dim = 128  # F.
  c.power_k = 2  # K powers of the transition (paper default 2).
  c.power_iters = 5  # Power-iteration steps for sigma_max (reference: 20).
  c.chunk_size = 32  # Chunk of the chunked training pass.
  c.eval_chunk_size = 256  # Chunk of the evaluation prefill.
  # Training (optax adamw, MQAR rows from kvjax.tasks.mqar).
  c.seed = 0  # Params and training rows.
  c.batch_size = 16  # Rows per step.
  # Curriculum: (num_pairs, context_len incl. BOS), one per equal share of
  # max_steps.
  c.pairs_schedule = (4, 8, 16, 32)
  c.context_schedule = (24, 32, 48, 80)
  c.learning_rate = 3e-3  # Peak of a warmup + cosine schedule.
  c.warmup_steps = 50  # Linear warmup steps.
  c.max_steps = 3000  # Steps (the curriculum and the lr decay span them).
  c.max_minutes = 22.0  # Wall-clock cap of training (stops early, logged).
  c.log_every = 20  # Steps between progress lines.
  # Evaluation (MQAR, 32 pairs, prefix placement, held-out seed).
  c.eval_pairs = 32  # num_pairs of every evaluated row.
  c.eval_context_lens = (512, 1024, 2048, 4096)  # Contexts (BOS included).
  c.eval_examples = 32  # Rows per context.
  c.eval_batch_size = 16  # Rows per call.
  c.eval_seed = 12345  # Held-out rows (training uses `seed`).
  return c
