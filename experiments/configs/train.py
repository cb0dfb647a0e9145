"""Config of the training job (`experiments/train.py`).

The commands that use it (kvjax-tiny, the AdamW vs Muon comparison, a
smoke run) are listed in `experiments/train.py`'s docstring.

The argument after ':' picks a preset ("tiny" default, "compare",
"twohop", "smoke"); any field can then be overridden with
--config.<field>=<value>. The job turns this ConfigDict into a typed
`kvjax.train.TrainConfig` (`TrainConfig.from_dict`), which checks every
field and documents what each one means: the optimizer fields below are
`OptimizerConfig`'s (`optimizer` its name, `lr_restarts` its restarts),
the `eval_*` fields `EvalConfig`'s, `data` is a `DataConfig` (phases, and
the `Mixture` fields every phase starts from) and `model` a
`kvjax.ModelConfig`.
"""

import ml_collections
from ml_collections import config_dict

TASKS_ALL = {
  "mqar": 0.35,
  "needle": 0.15,
  "multihop": 0.2,
  "overwrite": 0.15,
  "abstention": 0.15,
}


def _phase(until, context_lens, mqar_pairs, **overrides):
  """A `kvjax.train.Phase` as a ConfigDict."""
  p = ml_collections.ConfigDict()
  p.until = until  # The phase covers steps below this (exclusive).
  p.context_lens = context_lens  # One drawn uniformly per step.
  p.mqar_pairs = mqar_pairs  # mqar num_pairs drawn per step in this phase.
  for name, value in overrides.items():  # Any other Mixture field, e.g.
    p[name] = value  # tokens_per_step, task_fractions, multihop_hops.
  return p


# First phase: recall-heavy (the induction/recall circuit forms first).
TASKS_RECALL = {
  "mqar": 0.5,
  "needle": 0.15,
  "multihop": 0.15,
  "overwrite": 0.1,
  "abstention": 0.1,
}


# Later phases: multi-hop-heavy (2-hop is the slowest task to learn).
TASKS_HOPS = {
  "mqar": 0.2,
  "needle": 0.1,
  "multihop": 0.4,
  "overwrite": 0.15,
  "abstention": 0.15,
}

# The second cycle at 512: the tasks still short of the bar get more rows.
TASKS_LATE = {
  "mqar": 0.15,
  "needle": 0.25,
  "multihop": 0.2,
  "overwrite": 0.3,
  "abstention": 0.1,
}

# The third cycle: multi-hop as a walk (the answer names every node after
# the start); overwrite keeps a quarter of the rows.
TASKS_WALK = {
  "mqar": 0.15,
  "needle": 0.15,
  "multihop": 0.3,
  "overwrite": 0.25,
  "abstention": 0.15,
}

PRESETS = ("tiny", "compare", "twohop", "smoke")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the train config of `preset` (see `PRESETS`)."""
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}; allowed: {', '.join(PRESETS)}.")
  c = ml_collections.ConfigDict()

  # Model: kvjax-tiny, a Llama-architecture decoder run by kvjax.forward.
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 512  # kvjax.tasks.VOCAB.size.
  # Small on purpose: d=64, 3 layers learns every recall task in ~10k CPU
  # steps, and multi-hop as a walk; not latent 2-hop (results/train/
  # plateau.md: wider and deeper models sat on the MQAR plateau as long or
  # longer in the pilots; results/train/twohop.md).
  m.d_model = 64  # D, residual width.
  m.num_layers = 3  # L; latent k hops need about k + 1, a walk k steps.
  m.num_heads = 2  # N, query heads.
  m.num_kv_heads = 2  # K, key/value heads.
  m.head_dim = 32  # H.
  m.mlp_dim = 128  # F, SwiGLU width.
  m.rope_theta = 10000.0  # RoPE base.
  m.norm_eps = 1e-6  # RMSNorm epsilon.
  m.tie_embeddings = True  # LM head = embedding (copying is then easy).
  m.max_position_embeddings = 2048  # Informational: longest eval context.
  m.dtype = "float32"  # Training dtype (the shipped weights are float32).
  m.name = "kvjax-tiny"  # Label.

  # Optimization.
  # AdamW: at the same 3,000 steps of this recipe Muon split (0.02) never
  # carried the copy circuit to MQAR (results/train/comparison.md).
  c.optimizer = "adamw"  # "adamw" | "muon_split".
  c.learning_rate = 3e-3  # Peak LR (Muon's for muon_split, AdamW's for adamw).
  c.adam_learning_rate = 3e-3  # Peak LR of the AdamW half of muon_split.
  c.weight_decay = 0.0  # Decoupled decay on hidden matrices only.
  c.b1 = 0.9  # Adam beta1.
  c.b2 = 0.95  # Adam beta2.
  c.grad_clip = 1.0  # Global-norm clip (0 = none).
  c.warmup_steps = 100  # Linear warmup.
  c.final_lr_fraction = 0.1  # Cosine ends at this fraction of the peak.
  # 0: warmup + cosine over the whole run. > 0: warmup, constant, cosine
  # over the last decay_steps (WSD; earlier rates do not depend on
  # total_steps, so the run can be lengthened).
  c.decay_steps = 1500
  c.init_std = 0.02  # Std of the normal init of matrices.
  # Std of the residual-output matrices (wo, w_down); None: init_std.
  c.init_out_std = config_dict.placeholder(float)
  c.total_steps = 17600  # Updates in all.
  # Steps where a new WSD cycle starts (warm up again, constant, decay), so
  # a finished run can be continued without changing its earlier rates.
  # kvjax-tiny: the first cycle (12,700 steps) was the whole run until
  # its needle and overwrite fell short at 512; the second one trains on;
  # the third (1,600 steps: warmup + decay) teaches multi-hop walks.
  c.lr_restarts = (12700, 16000)
  c.seed = 0  # Init and data seed (data of step s = f(seed, s)).
  c.loss_on = "answers"  # "answers" (answer tokens) | "all" (every token).

  # Data: the task suite (kvjax.train.DataConfig; kvjax.train.Mixture
  # documents every field a phase may override).
  d = c.data = ml_collections.ConfigDict()
  # Curriculum. Copy rows first: pure MQAR sits on its elimination plateau
  # (0.52 at 4 pairs, answering with an unrevealed context value) for
  # thousands of steps, while copy rows (a target at every repeated
  # token) form the induction circuit in ~1,000 steps; MQAR then reaches
  # 1.0 at once (results/train/plateau.md). Then the recall mixture at
  # 32-64, multi-hop-heavy from step 7,000 (2-hop lagged), then 128/256,
  # then 512 with some 768. Phase boundaries were set while the run went
  # (each change only touched steps not yet run; with the WSD schedule the
  # rate of a step does not depend on later ones), so this config
  # reproduces the shipped run in one command.
  d.phases = [
    _phase(
      2000,
      [24],
      [4, 6],
      task_fractions={"mqar": 1.0},
      copy_fraction=0.75,
      tokens_per_step=1536,
    ),
    _phase(
      4000,
      [24, 32],
      [4, 6, 8],
      task_fractions={"mqar": 1.0},
      copy_fraction=0.25,
      tokens_per_step=1536,
    ),
    _phase(
      7000,
      [32, 48, 64],
      [8, 12, 16],
      task_fractions=dict(TASKS_RECALL),
      copy_fraction=0.1,
      multihop_hops=[1, 2],
    ),
    # 2-hop lagged (train 0.29 at step 6,800 vs 0.98 for 1 hop):
    # more multihop rows, two thirds of them 2-hop.
    _phase(
      8500,
      [32, 48, 64],
      [8, 12, 16],
      task_fractions=dict(TASKS_HOPS),
      copy_fraction=0.1,
      multihop_hops=[1, 2, 2],
    ),
    _phase(
      9700,
      [128, 256],
      [16, 24, 32],
      task_fractions=dict(TASKS_HOPS),
      tokens_per_step=4096,
      multihop_hops=[1, 2, 2],
    ),
    _phase(
      12700,
      [512, 512, 512, 768],
      [16, 32],
      task_fractions=dict(TASKS_HOPS),
      tokens_per_step=4096,
      multihop_hops=[1, 2, 2],
    ),
    # Second cycle (lr_restarts): needle and overwrite.
    _phase(
      16000,
      [512, 512, 512, 768],
      [16, 32],
      task_fractions=dict(TASKS_LATE),
      tokens_per_step=4096,
      multihop_hops=[1, 2, 2],
    ),
    # Third cycle: latent 2-hop stayed at chance through two
    # cycles; the walk asks one lookup per answer token.
    _phase(
      17600,
      [512, 512, 512, 768],
      [16, 32],
      task_fractions=dict(TASKS_WALK),
      tokens_per_step=4096,
      multihop_hops=[1, 2, 2, 3, 4],
      multihop_walk=True,
    ),
  ]
  d.tokens_per_step = 2048  # Rows per step = tokens_per_step // context.
  d.task_fractions = dict(TASKS_ALL)  # Share of rows per task.
  d.mqar_pairs = [8, 16, 24, 32]  # Default mqar num_pairs (phases override).
  d.mqar_placements = ["prefix", "scattered"]  # mqar placement per step.
  d.copy_fraction = 0.0  # Share of copy rows (a training aid; phases set it).
  # Multi-hop aids (kvjax.train.data.chain_batch, the lens loss; the
  # "twohop" preset uses them).
  d.chain_fraction = 0.0  # Share of chain rows.
  d.chain_count = 4  # At most this many chains per chain row.
  d.chain_hops = [1, 2]  # Links per chain, drawn per chain.
  d.chain_key_ends = 0.0  # Share of chains ending at a key id.
  d.lens_weight = 0.0  # Weight of the lens loss (kvjax.train.loop.loss_fn).
  d.multihop_hops = [1, 2, 3, 4]  # Hops drawn per multihop row.
  d.multihop_walk = False  # Multihop answers: the end (latent) or the walk.
  d.multihop_distractor_chains = 2  # Chains besides the queried one.
  d.needle_distractors = 3  # Facts besides the needle.
  d.overwrite_writes = 2  # Assignments of the queried key.
  d.overwrite_distractors = 3  # Other facts in overwrite.
  d.abstention_distractors = 4  # Facts in abstention (none queried).

  # Bookkeeping.
  c.log_every = 10  # Steps between metric rows in metrics.jsonl.
  c.checkpoint_every = 200  # Steps between orbax checkpoints.
  c.max_checkpoints = 2  # Checkpoints kept.
  c.eval_every = 0  # Steps between in-training evals (0 = end only).
  c.eval_context_lens = (512,)  # Contexts of the final eval (a tuple).
  c.eval_examples = 256  # Held-out rows per (task, context) in evals.
  c.eval_seed = 12345  # Held-out eval seed (training uses `seed`).
  c.eval_mqar_pairs = 32  # Key-value pairs of mqar in evals.

  if preset == "compare":
    # AdamW vs Muon split on the kvjax-tiny model and the first part of its
    # stream, shortened: copy rows + mqar at context 24, then the recall
    # mixture at 32-64; the same WSD schedule shape, 3,000 steps.
    c.total_steps = 3000
    c.decay_steps = 500
    c.lr_restarts = ()
    d.phases = [
      _phase(
        1500,
        [24],
        [4, 6],
        task_fractions={"mqar": 1.0},
        copy_fraction=0.75,
        tokens_per_step=1536,
      ),
      _phase(
        3000,
        [32, 48, 64],
        [8, 12, 16],
        task_fractions=dict(TASKS_RECALL),
        copy_fraction=0.1,
        multihop_hops=[1, 2],
      ),
    ]
    c.log_every = 25
    c.eval_context_lens = (64,)
    c.eval_examples = 128
    c.eval_mqar_pairs = 16
  elif preset == "twohop":
    # The 2-hop attempt of results/train/twohop.md: a 4-layer kvjax-tiny
    # with the multi-hop aids (chain rows, lens loss, key ends), run to
    # step 12,400 (--stop_after=12400 --eval_at_stop; the later phases
    # were never run). Phases were set while the run went, each change
    # only touching steps not yet run.
    m.num_layers = 4
    c.lr_restarts = ()
    c.total_steps = 16400
    d.phases = [
      _phase(
        2000,
        [24],
        [4, 6],
        task_fractions={"mqar": 1.0},
        copy_fraction=0.75,
        tokens_per_step=1536,
      ),
      _phase(
        4000,
        [24, 32],
        [4, 6, 8],
        task_fractions={"mqar": 1.0},
        copy_fraction=0.25,
        tokens_per_step=1536,
      ),
      _phase(
        7000,
        [32, 48, 64],
        [8, 12, 16],
        task_fractions=dict(TASKS_RECALL),
        copy_fraction=0.1,
        chain_fraction=0.25,
        multihop_hops=[1, 2],
      ),
      _phase(
        8400,
        [32, 48, 64],
        [8, 12, 16],
        task_fractions=dict(TASKS_HOPS),
        copy_fraction=0.05,
        chain_fraction=0.5,
        chain_count=8,
        chain_hops=[2],
        multihop_hops=[1, 2, 2],
      ),
      _phase(
        10400,
        [48, 64],
        [8, 12, 16],
        task_fractions=dict(TASKS_HOPS),
        copy_fraction=0.05,
        chain_fraction=0.25,
        chain_count=8,
        chain_hops=[2],
        chain_queries=4,
        lens_weight=1.0,
        multihop_hops=[1, 2, 2],
      ),
      # Run until 12,400 (--stop_after), when it was stopped.
      _phase(
        16400,
        [48, 64],
        [8, 12, 16],
        task_fractions=dict(TASKS_HOPS),
        copy_fraction=0.05,
        chain_fraction=0.3,
        chain_count=8,
        chain_hops=[1, 2],
        chain_queries=4,
        chain_key_ends=0.5,
        lens_weight=1.0,
        multihop_hops=[1, 2, 2],
      ),
    ]
    c.eval_context_lens = (64,)
    c.eval_mqar_pairs = 16
  elif preset == "smoke":
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 64, 2, 4, 2
    m.head_dim, m.mlp_dim = 16, 128
    c.total_steps = 20
    c.lr_restarts = ()
    c.warmup_steps = 5
    c.decay_steps = 5
    d.phases = [_phase(20, [64], [4, 8])]
    d.mqar_pairs = [4, 8]
    d.tokens_per_step = 1024
    c.log_every = 5
    c.checkpoint_every = 10
    c.eval_context_lens = (64,)
    c.eval_examples = 32
    c.eval_mqar_pairs = 8
  return c
