"""Residual-stream anatomy of a model on a task: numbers (JSON) and figures.

For the rows of one task it reports, per layer: residual norm growth,
attention vs MLP writes (norms, energy share, alignment), the logit lens on
the answers (accuracy, entropy), the energy in the near-null space of the
LM head, DCT compressibility of hidden states along tokens and features,
local Jacobian spectra on a short input (spectral radius, departure from
normality, effective rank of cumulative products), the damage of
interventions on each layer's attention and MLP writes (ablate, rotate
(norm-preserving), rescale, add noise) as KL and accuracy, and the drift of
cached decode against full recompute in float32 and bfloat16.

  python -m experiments.anatomy                     # kvjax-tiny on mqar
  python -m experiments.anatomy --config.model=hf:/path/to/checkpoint
"""

from __future__ import annotations

import json
import os
import time

from absl import app
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import common
from experiments import plotting
import kvjax
from kvjax.analysis import drift
from kvjax.analysis import residual
from kvjax.tasks import generators
from kvjax.tasks import suite


def _floats(x):
  return [float(v) for v in np.asarray(x).reshape(-1)]


def _task_batch(cfg):
  if cfg.task not in suite.SUITE_NAMES:
    raise ValueError(
      f"config.task={cfg.task!r}; allowed: {list(suite.SUITE_NAMES)}."
    )
  _, entry = suite.suite_entry(cfg.task)
  params = dict(entry.params)
  if entry.task == "mqar":
    params["num_pairs"] = int(cfg.mqar_pairs)
  return generators.make_batch(
    entry.task,
    int(cfg.num_examples),
    seed=int(cfg.seed),
    context_len=int(cfg.context_len),
    **params,
  )


def report(cfg) -> dict:
  """Computes every number of the report (a JSON-able dict)."""
  config, params = common.load_model(cfg.model, cfg.dtype)
  batch = _task_batch(cfg)
  tokens = jnp.asarray(batch.tokens)
  B, T = tokens.shape
  mask = jnp.asarray(np.arange(T)[None, :] < batch.lengths[:, None])
  cache = kvjax.init_cache(config, B, T)
  _, _, aux = kvjax.forward(
    params,
    tokens,
    cache,
    config=config,
    token_mask=mask,
    capture=("resid", "attn_out", "mlp_out", "final_hidden"),
  )
  positions = residual.prediction_positions(batch.answer_positions)
  targets = jnp.asarray(
    np.where(batch.answer_positions >= 0, batch.answers, -1)
  )
  out = {
    "model": cfg.model,
    "task": cfg.task,
    "num_layers": config.num_layers,
    "d_model": config.d_model,
    "rows": B,
    "context_len": int(cfg.context_len),
  }

  growth = residual.norm_growth(aux["resid"], aux["final_hidden"], mask)
  out["norm_growth"] = {
    "rms": _floats(growth.rms),
    "growth": _floats(growth.growth),
  }
  ws = residual.write_stats(aux["resid"], aux["attn_out"], aux["mlp_out"], mask)
  out["writes"] = {k: _floats(v) for k, v in ws._asdict().items()}
  lens = residual.logit_lens(
    params, config, aux["resid"], aux["final_hidden"], positions, targets
  )
  out["logit_lens"] = {
    "accuracy": _floats(lens.accuracy),
    "entropy": _floats(lens.entropy),
    "target_logprob": _floats(lens.target_logprob),
  }
  hidden = jnp.concatenate([aux["resid"], aux["final_hidden"][None]], 0)
  null = residual.null_space_energy(
    params, config, hidden, fraction=float(cfg.null_fraction), token_mask=mask
  )
  out["null_space"] = {
    "energy": _floats(null.energy),
    "k": int(null.k),
    "baseline": float(null.baseline),
    "singular_values": _floats(null.singular_values),
  }
  fractions = tuple(float(f) for f in str(cfg.dct_fractions).split(","))
  out["dct"] = {"fractions": list(fractions)}
  for axis in ("tokens", "features"):
    d = residual.dct_compressibility(
      hidden, axis=axis, keep_fractions=fractions, token_mask=mask
    )
    out["dct"][axis] = np.asarray(d.energy).tolist()  # [L + 1, F]

  n = int(cfg.jacobian_tokens)
  jac = residual.layer_jacobians(
    params, config, tokens[:1, :n], return_matrices=False
  )
  out["jacobians"] = {
    "tokens": n,
    "spectral_radius": _floats(jac.spectral_radius),
    "spectral_norm": _floats(jac.spectral_norm),
    "henrici": _floats(jac.henrici),
    "effective_rank": _floats(jac.effective_rank),
    "product_effective_rank": _floats(jac.product_effective_rank),
    "top_eigenvalue_moduli": np.abs(jac.eigenvalues).tolist(),
  }

  wanted = str(cfg.interventions).split(",")
  allowed = ("ablate", "rotate", "scale", "noise")
  if set(wanted) - set(allowed):
    raise ValueError(
      f"config.interventions={cfg.interventions!r}; allowed: {allowed}."
    )
  modes = (
    [("ablate", 0.0), ("rotate", 1.0)]
    + [("scale", float(s)) for s in str(cfg.scales).split(",")]
    + [("noise", float(cfg.noise))]
  )
  modes = [(m, s) for m, s in modes if m in wanted]
  damage = []
  for layer in range(config.num_layers):
    for kind in ("attn", "mlp"):
      for mode, scale in modes:
        fn = residual.intervene_writes(
          kind, layer, mode=mode, scale=scale, rng=layer
        )
        d = residual.intervention_damage(
          params, config, tokens, fn, positions, targets, mask
        )
        damage.append(
          dict(
            layer=layer,
            kind=kind,
            mode=mode,
            scale=scale,
            kl=float(d.kl),
            clean_accuracy=float(d.clean_accuracy),
            accuracy=float(d.intervened_accuracy),
            agreement=float(d.agreement),
          )
        )
  out["interventions"] = damage

  m = min(int(cfg.drift_tokens), T)
  out["drift"] = {}
  for dtype in ("float32", "bfloat16"):
    d = drift.cache_drift(params, config, tokens[:2, :m], dtype)
    out["drift"][dtype] = {
      k: (float(v) if not isinstance(v, str) else v)
      for k, v in d._asdict().items()
      if v is not None and np.ndim(v) == 0
    }
  return out


def plot(rep: dict, workdir: str) -> None:
  """Writes anatomy.png (four panels) and interventions.png."""
  plt = plotting.pyplot()

  L = rep["num_layers"]
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  ax = axes[0, 0]
  ax.plot(range(L + 1), rep["norm_growth"]["rms"], "k-o", label="residual")
  ax.plot(range(L), rep["writes"]["attn_rms"], "-s", label="attention write")
  ax.plot(range(L), rep["writes"]["mlp_rms"], "-^", label="MLP write")
  ax.set_xlabel("layer (L = final hidden)")
  ax.set_ylabel("mean RMS per token")
  ax.set_title("norm growth and writes")
  ax.legend()
  ax = axes[0, 1]
  ax.plot(range(L + 1), rep["logit_lens"]["accuracy"], "-o", label="accuracy")
  ax2 = ax.twinx()
  ax2.plot(range(L + 1), rep["logit_lens"]["entropy"], "r--s", label="entropy")
  ax.set_xlabel("layer read out (0 = embeddings)")
  ax.set_ylabel("answer accuracy")
  ax2.set_ylabel("entropy (nats)", color="r")
  ax.set_title("logit lens")
  ax = axes[1, 0]
  fr = rep["dct"]["fractions"]
  for axis, style in (("tokens", "-"), ("features", "--")):
    for l, e in enumerate(rep["dct"][axis]):
      ax.plot(
        fr,
        e,
        style,
        color=f"C{l}",
        label=f"x{l} {axis}" if l in (0, L) else None,
      )
  ax.set_xscale("log")
  ax.set_xlabel("share of DCT coefficients kept")
  ax.set_ylabel("energy kept")
  ax.set_title("DCT compressibility (solid: tokens, dashed: features)")
  ax.legend(fontsize=7)
  ax = axes[1, 1]
  ax.plot(
    range(L + 1),
    rep["null_space"]["energy"],
    "-o",
    label="near-null-space energy",
  )
  ax.axhline(
    rep["null_space"]["baseline"], color="k", ls=":", label="isotropic baseline"
  )
  ax.plot(
    range(L),
    rep["jacobians"]["henrici"],
    "-s",
    label="Jacobian departure from normality",
  )
  ax.set_xlabel("layer")
  ax.set_title("LM-head null space; Jacobian non-normality")
  ax.legend(fontsize=8)
  plotting.save(fig, os.path.join(workdir, "anatomy.png"))

  rows = rep["interventions"]
  labels = sorted(
    {(r["mode"], r["scale"]) for r in rows}, key=lambda x: (x[0], x[1])
  )
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, field, title in (
    (axes[0], "kl", "KL(clean || intervened)"),
    (axes[1], "accuracy", "answer accuracy"),
  ):
    grid = np.full((2 * L, len(labels)), np.nan)
    for r in rows:
      i = 2 * r["layer"] + (r["kind"] == "mlp")
      grid[i, labels.index((r["mode"], r["scale"]))] = r[field]
    im = ax.imshow(
      grid, aspect="auto", cmap="magma_r" if field == "kl" else "viridis"
    )
    ax.set_yticks(range(2 * L))
    ax.set_yticklabels([f"L{l} {k}" for l in range(L) for k in ("attn", "mlp")])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(
      [m if m in ("ablate", "rotate") else f"{m} {s:g}" for m, s in labels],
      rotation=30,
    )
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
  plotting.save(fig, os.path.join(workdir, "interventions.png"))


def main(argv):
  del argv
  cfg = _CONFIG.value
  os.makedirs(cfg.workdir, exist_ok=True)
  t0 = time.time()
  rep = report(cfg)
  rep["seconds"] = round(time.time() - t0, 1)
  with open(os.path.join(cfg.workdir, "anatomy.json"), "w") as f:
    json.dump(rep, f, indent=2)
  if cfg.plots:
    plot(rep, cfg.workdir)
  print(
    json.dumps(
      {k: rep[k] for k in ("norm_growth", "writes", "logit_lens", "drift")},
      indent=1,
    )
  )
  print(f"wrote {cfg.workdir}/anatomy.json in {rep['seconds']} s")


if __name__ == "__main__":
  # Defined here, not at import, so tests can import several mains.
  _CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "configs", "anatomy.py"),
    "Anatomy config (see experiments/configs/anatomy.py).",
  )
  app.run(main)
