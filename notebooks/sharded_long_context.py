# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A long context on every device: the sequence-sharded KV cache
#
# [Open in Colab](https://colab.research.google.com/github/kvjax/kvjax/blob/main/notebooks/sharded_long_context.ipynb)
# (the link assumes the placeholder repository URL of the next cell; pick a
# TPU runtime to run on its cores).
#
# `kvjax.parallel` splits the KV cache's slots over the devices of a mesh
# axis `seq` (rows over `data`, kv heads over `heads`): prefill is context
# parallel, each decode step attends to every shard locally and merges the
# partial results by log-sum-exp, and eviction picks a global top-k from
# per-shard proposals. `prefill`, `generate` and `decode` take `mesh=` and
# return the same tokens as on one device.
#
# This notebook uses every device present: the cores of a TPU runtime, the
# GPUs, or, on a CPU, 8 simulated devices (XLA's
# `--xla_force_host_platform_device_count=8`, set below before jax is
# imported). It prompts `kvjax-tiny` with a context as long as its
# positions allow, compresses the cache with SnapKV + KIVI-2 on one device
# and on the mesh, checks that the generated tokens are equal, and shows
# the bytes each device holds.

# %%
# On Colab: install kvjax from its repository (skipped anywhere else), with
# jax for the runtime's accelerator.
import glob
import os
import shutil
import subprocess
import sys

# PLACEHOLDER: the URL of the kvjax repository; change it for a fork.
KVJAX_REPO = "https://github.com/kvjax/kvjax"

if "google.colab" in sys.modules:
  packages = [f"kvjax[plot] @ git+{KVJAX_REPO}"]
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    packages.append("jax[tpu]==0.10.2")  # a TPU VM runtime
  elif shutil.which("nvidia-smi"):
    packages.append("jax[cuda12]==0.10.2")
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", *packages], check=True
  )
  print(
    "Installed kvjax. If pip replaced numpy or jax, restart the session "
    "(Runtime > Restart session) and run the notebook again."
  )

# %% tags=["parameters"]
# Sizes. CI (tests/test_notebooks.py) runs the notebook small through the
# KVJAX_NB_* environment variables; papermill can also override this cell.
BATCH = int(os.environ.get("KVJAX_NB_BATCH", "4"))  # prompts
# Context tokens (BOS included); 0: as long as kvjax-tiny's positions allow.
CONTEXT_LEN = int(os.environ.get("KVJAX_NB_CONTEXT_LEN", "0"))
NEW_TOKENS = int(os.environ.get("KVJAX_NB_NEW_TOKENS", "8"))  # generated
RATIO = float(os.environ.get("KVJAX_NB_RATIO", "0.5"))  # SnapKV evicts
# The mesh: "seq:8", "data:2,seq:4", "data:2,heads:2,seq:2", ...; "": every
# device on `seq`.
MESH = os.environ.get("KVJAX_NB_MESH", "")
SIMULATED_DEVICES = 8  # CPU devices to simulate without an accelerator

# %% [markdown]
# ## Devices
#
# On a machine without a TPU or GPU, XLA can split the host CPU into
# simulated devices; the flag must be set before jax is imported, and is
# left alone when already set (CI sets it).

# %%
accelerator = bool(
  glob.glob("/dev/accel*")  # a TPU VM
  or glob.glob("/dev/vfio/[0-9]*")  # a TPU VM of a newer generation
  or shutil.which("nvidia-smi")  # a GPU
)
flags = os.environ.get("XLA_FLAGS", "")
if not accelerator and "xla_force_host_platform_device_count" not in flags:
  if "jax" in sys.modules:
    print("jax is already imported: restart the kernel to simulate devices.")
  os.environ["XLA_FLAGS"] = (
    f"{flags} --xla_force_host_platform_device_count={SIMULATED_DEVICES}"
  ).strip()

import jax
import matplotlib.pyplot as plt
import numpy as np

import kvjax
from kvjax import compress, parallel, tasks

devices = jax.devices()
print(f"{len(devices)} {devices[0].platform} devices: {devices}")

# %% [markdown]
# ## A long prompt
#
# `kvjax-tiny` has `max_position_embeddings` positions (it was trained up
# to 768, so its answers get worse past that: the point here is that the
# mesh changes no token, not the accuracy). The prompt is a needle task:
# facts scattered in filler, then a question.

# %%
config, params = kvjax.pretrained.load("kvjax-tiny")
seed, entry = tasks.suite_entry("needle")
# Room after the context for the question (a few tokens) and the generation.
longest = config.max_position_embeddings - NEW_TOKENS - 16
context_len = min(CONTEXT_LEN or longest, longest)
batch = tasks.make_batch(
  entry.task, BATCH, seed=(0, seed), context_len=context_len, **entry.params
)
width = int(batch.answer_start.max())
before_answer = np.arange(width)[None, :] < batch.answer_start[:, None]
prompts = np.where(before_answer, batch.tokens[:, :width], tasks.PAD)
print(
  f"max_position_embeddings {config.max_position_embeddings}; "
  f"{BATCH} prompts of up to {width} tokens, {NEW_TOKENS} new tokens each"
)
print("row 0:", tasks.render(prompts[0]))

# %% [markdown]
# ## One device, then the mesh
#
# `make_mesh(None)` puts every device on `seq`. The transform is the same
# value in both calls; `generate(..., mesh=mesh)` places the parameters
# (replicated), the prompts and the cache (sharded) on the mesh and runs
# the same program under it.

# %%
mesh = parallel.make_mesh(MESH or None)
print("mesh:", dict(mesh.shape))
transform = compress.chain(compress.snapkv(ratio=RATIO), compress.kivi(bits=2))


def run(mesh):
  return kvjax.generate(
    params,
    prompts,
    config=config,
    max_new_tokens=NEW_TOKENS,
    prompt_lengths=batch.answer_start,
    transform=transform,
    mesh=mesh,
  )


single = run(None)
sharded = run(mesh)
same = np.array_equal(np.asarray(single.tokens), np.asarray(sharded.tokens))
print("answer    :", tasks.render(batch.answers[0]))
print("one device:", tasks.render(single.tokens[0]))
print("mesh      :", tasks.render(sharded.tokens[0]))
print("same tokens on every row:", same)
assert same, "the mesh changed the generated tokens"
acc = tasks.score(batch, np.asarray(sharded.tokens)[:, :1])[entry.task]
print(f"needle accuracy (first token) at context {context_len}: {acc.accuracy}")

# %% [markdown]
# ## Bytes per device
#
# `parallel.device_bytes` adds up the shards each device holds.
# `shard_cache` places a cache computed on one device onto the mesh,
# padding its capacity with empty slots when it does not split evenly (the
# padding is returned and warned about, never hidden).

# %%
on_mesh = parallel.device_bytes(sharded.cache)
placed = parallel.shard_cache(single.cache, mesh)
print(f"one device: {kvjax.kv_bytes(single.cache):,} bytes")
print(
  f"mesh: {sum(on_mesh.values()):,} bytes over {len(on_mesh)} devices "
  f"(replicated leaves count on each)"
)
for device, nbytes in sorted(on_mesh.items(), key=lambda kv: kv[0].id):
  print(f"  {device}: {nbytes:,}")
print(f"shard_cache of the one-device cache: padding {placed.padding} slots")

ids = sorted(on_mesh, key=lambda d: d.id)
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar([str(d.id) for d in ids], [on_mesh[d] / 1e3 for d in ids])
ax.axhline(
  kvjax.kv_bytes(single.cache) / 1e3 / len(ids),
  color="k",
  ls="--",
  label="one-device cache / devices",
)
ax.set(xlabel="device", ylabel="KB of the KV cache")
ax.set_ylim(0, 1.35 * max(on_mesh.values()) / 1e3)
axes = ",".join(f"{a}:{n}" for a, n in mesh.shape.items())
ax.set_title(f"snapkv({RATIO:g}) + kivi2, context {context_len}, mesh {axes}")
ax.legend(loc="upper right")
fig.tight_layout()
plt.show()
