# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # kvjax quickstart: compress the KV cache of kvjax-tiny
#
# [Open in Colab](https://colab.research.google.com/github/kvjax/kvjax/blob/main/notebooks/quickstart.ipynb)
# (the link assumes the placeholder repository URL of the next cell).
#
# This notebook loads the shipped `kvjax-tiny` (a 3-layer Llama-architecture
# decoder trained on kvjax's synthetic tasks; 0.6 MB, no download), draws a
# batch of needle-in-a-haystack prompts from the task suite, compresses the
# KV cache with SnapKV eviction followed by KIVI 2-bit quantization,
# generates the answers, and compares the cache's physical bytes with the
# uncompressed cache. It ends with accuracy and bytes over a few eviction
# ratios. It runs on a CPU in a minute or two.

# %%
# On Colab: install kvjax from its repository (skipped anywhere else).
import subprocess
import sys

# PLACEHOLDER: the URL of the kvjax repository; change it for a fork.
KVJAX_REPO = "https://github.com/kvjax/kvjax"

if "google.colab" in sys.modules:
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q"]
    + [f"kvjax[plot] @ git+{KVJAX_REPO}"],
    check=True,
  )
  print(
    "Installed kvjax. If pip replaced numpy or jax, restart the session "
    "(Runtime > Restart session) and run the notebook again."
  )

# %% tags=["parameters"]
# Sizes. CI (tests/test_notebooks.py) runs the notebook small through the
# KVJAX_NB_* environment variables; papermill can also override this cell.
import os

BATCH = int(os.environ.get("KVJAX_NB_BATCH", "16"))  # prompts per batch
CONTEXT_LEN = int(os.environ.get("KVJAX_NB_CONTEXT_LEN", "512"))  # + BOS
RATIO = float(os.environ.get("KVJAX_NB_RATIO", "0.5"))  # share evicted
# The closing figure: methods (kvjax.compress.registry names) over eviction
# ratios (0: the uncompressed cache).
METHODS = os.environ.get("KVJAX_NB_METHODS", "snapkv+kivi2,snapkv").split(",")
RATIOS = [
  float(r)
  for r in os.environ.get("KVJAX_NB_RATIOS", "0,0.5,0.75,0.9,0.95").split(",")
]
TASK = os.environ.get("KVJAX_NB_TASK", "needle")  # a kvjax.tasks.SUITE name

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

import kvjax
from kvjax import compress, tasks
from kvjax.compress import registry

print("jax", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## The model and a prompt from the task suite
#
# `kvjax.pretrained.load` returns a `ModelConfig` and a plain parameter
# pytree. A task batch holds whole rows (context, question, answers); the
# prompt is everything before the first answer token.

# %%
config, params = kvjax.pretrained.load("kvjax-tiny")
print(
  f"{config.name}: {config.num_layers} layers, d_model {config.d_model}, "
  f"{config.num_heads} query / {config.num_kv_heads} kv heads, "
  f"head_dim {config.head_dim}, vocab {config.vocab_size}"
)

seed, entry = tasks.suite_entry(TASK)
batch = tasks.make_batch(
  entry.task, BATCH, seed=(0, seed), context_len=CONTEXT_LEN, **entry.params
)
width = int(batch.answer_start.max())
before_answer = np.arange(width)[None, :] < batch.answer_start[:, None]
prompts = np.where(before_answer, batch.tokens[:, :width], tasks.PAD)
num_answers = batch.answers.shape[1]
print(f"{BATCH} prompts of up to {width} tokens; row 0:")
print(tasks.render(prompts[0]))

# %% [markdown]
# ## Generate with a compressed cache
#
# A transform is a value: `chain(snapkv(ratio), kivi(bits=2))` evicts the
# share `ratio` of the entries (scored by the attention of the prompt's last
# 64 queries, which include the question), then stores the kept ones as
# 2-bit KIVI codes. `generate` prefills, compresses and decodes in one jitted
# call.


# %%
def run(transform):
  """Greedy answers of the batch; the cache the transform leaves."""
  return kvjax.generate(
    params,
    prompts,
    config=config,
    max_new_tokens=num_answers,
    prompt_lengths=batch.answer_start,
    transform=transform,
  )


def chain(ratio):
  """SnapKV at `ratio`, then KIVI-2."""
  return compress.chain(compress.snapkv(ratio=ratio), compress.kivi(bits=2))


full = run(None)
small = run(chain(RATIO))
print("transform:", chain(RATIO).name)
print("answer   :", tasks.render(batch.answers[0]))
print("full     :", tasks.render(full.tokens[0]))
print("small    :", tasks.render(small.tokens[0]))
for name, out in (("uncompressed", full), ("compressed", small)):
  acc = tasks.score(batch, np.asarray(out.tokens))[entry.task].accuracy
  print(
    f"{name:>12}: accuracy {acc:.2f}, cache {kvjax.kv_bytes(out.cache):,} "
    f"physical bytes, {kvjax.logical_bytes(out.cache):,.0f} logical"
  )
print(
  f"physical bytes ratio: "
  f"{kvjax.kv_bytes(small.cache) / kvjax.kv_bytes(full.cache):.3f}"
)

# %% [markdown]
# Physical bytes are what the cache occupies in memory (padding, KIVI's
# full-precision window and bookkeeping included); logical bytes count
# only the payload of the live entries, what a ragged layout would need.
#
# ## Accuracy and bytes over eviction ratios
#
# `compress.registry` builds a transform from its name, the name every
# results row records: `registry.build("snapkv+kivi2", 0.5)` is the chain
# above, and since transforms compare by value it equals `chain(RATIO)`, so
# its run is reused (and a jitted entry would compile nothing new for it).
# Each new (method, ratio) is one `generate`, compiled once. A transform
# that would compress nothing for this input (too few kept entries to fill
# one KIVI block of 128) raises `compress.Degenerate` and is left out.

# %%
results = {}  # (method, ratio) -> (accuracy, physical MB, logical MB)
for method in METHODS:
  for ratio in RATIOS:
    transform = registry.build(method, ratio) if ratio else None
    try:
      if transform is None:
        out = full
      elif transform == chain(RATIO):
        out = small
      else:
        out = run(transform)
    except compress.Degenerate as e:
      print(f"{method} at {ratio:g}: refused ({e})")
      continue
    acc = tasks.score(batch, np.asarray(out.tokens))[entry.task].accuracy
    results[method, ratio] = (
      acc,
      kvjax.kv_bytes(out.cache) / 1e6,
      kvjax.logical_bytes(out.cache) / 1e6,
    )
    print(f"{method} at {ratio:g}: accuracy {acc:.2f}")

fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
for method in METHODS:
  rs = [r for r in RATIOS if (method, r) in results]
  for ax, i in zip(axes, range(3)):
    ax.plot(rs, [results[method, r][i] for r in rs], "o-", label=method)
axes[0].set(ylabel="accuracy", ylim=(-0.05, 1.05))
axes[0].set_title(f"{TASK}, {BATCH} rows (ratio 0: uncompressed)")
axes[1].set(ylabel="physical MB")
axes[2].set(ylabel="logical MB")
for ax in axes:
  ax.set_xlabel("eviction ratio")
  ax.set_ylim(bottom=0)
  ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# At the default sizes, every ratio still finds the needle. The prompt ends
# with the question, so SnapKV's observation window sees it: this is
# question-aware compression. `sweep_and_read` compares it with
# question-agnostic compression, which loses answers.
#
# The bytes show KIVI's cost. From ratio 0.75 its full-precision window
# (128 slots) is most of what is left, so the chain's physical bytes
# approach SnapKV's alone. Above that, the chain is refused.
