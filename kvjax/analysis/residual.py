"""Residual-stream anatomy: norms, writes, logit lens, spectra, Jacobians.

Pure functions over arrays captured by `kvjax.model.forward` (`capture=
("resid", "attn_out", "mlp_out", "final_hidden")`) and, where the readout
matters, the parameters; they work on any model kvjax loads. Conventions:

* `x_l` is the residual entering layer l (`resid[l]`), `x_L` the residual
  after the last layer (`final_hidden`); layer l computes
  `x_l + a_l` (attention write `a_l = attn_out[l]`) and then
  `x_{l+1} = x_l + a_l + m_l` (MLP write `m_l = mlp_out[l]`).
* `token_mask` [B, T] (True = real token) selects the tokens a statistic
  averages over; None means all. Every per-token statistic is averaged
  with equal weight per unmasked token ("mean over tokens").
* RMS of a vector w in R^D is ||w||_2 / sqrt(D).
* Read-out positions ([B, A] ints, any negative value = padding) name the
  hidden state whose *next-token* distribution is read; for a `TaskBatch`
  use `prediction_positions(batch.answer_positions)` and `batch.answers`.

Exact definitions:

* `norm_growth`: rms[l] = mean over tokens of RMS(x_l), l = 0..L;
  growth[l] = rms[l+1] / rms[l].
* `write_stats`: for each layer, the mean RMS of a_l and m_l; energy shares
  ||a_l||^2 / ||x_l||^2 and ||m_l||^2 / ||x_l + a_l||^2 (each write against
  the residual it is added to), and cosines cos(a_l, x_l) and
  cos(m_l, x_l + a_l); all per token, then averaged.
* `logit_lens`: logits_l = unembed(rms_norm(x_l, final_norm)) for
  l = 0..L (row L is the model's own output); accuracy of the argmax
  against the targets and mean entropy (nats) of softmax(logits_l).
* `null_space_energy`: let W = U diag(s) V^T be the SVD of the V x D
  unembedding (with the final RMSNorm weight g folded in, W diag(g), by
  default, so W is exactly the linear map the hidden direction goes
  through; RMSNorm's scalar 1/rms does not change directions). The near-null
  space is the span of the k right-singular vectors with the smallest
  singular values; the share of a hidden state h is ||P h||^2 / ||h||^2,
  P the orthogonal projector onto it, averaged over tokens. An isotropic
  random h has expected share k / D (`baseline`).
* `dct_compressibility`: orthonormal DCT-II along the token axis, the
  feature axis, or both (2-D); each 1-D fiber (a channel over tokens, a
  token's feature vector, or a row's whole [T, D] matrix for "both") keeps
  its k = max(1, round(f * n)) largest-magnitude coefficients; the result is
  the kept energy over the total energy, summed over all fibers of a layer,
  i.e. 1 - ||X - X_k||_F^2 / ||X||_F^2 (Parseval).
* `layer_jacobians`: J_l = d x_{l+1} / d x_l of one decoder layer on a
  [1, T] input, flattened token-major to a (T*D) x (T*D) matrix
  (row t*D + d is output token t, feature d); the layer is
  `kvjax.model.decoder_layer` on an empty cache of capacity T, in float32.
  Attention is causal, so J_l is block lower triangular in the T x T token
  blocks and its eigenvalues are those of its diagonal D x D blocks (which
  is how they are computed; see `block_triangular_eigvals`).
  Spectral radius max|lambda|; Henrici departure from normality
  sqrt(max(||J||_F^2 - sum|lambda|^2, 0)) / ||J||_F (0 for a normal matrix);
  effective rank exp(-sum p_i log p_i) with p_i = s_i / sum_j s_j over the
  singular values s (Roy & Vetterli, 2007), of J_l and of the cumulative
  product P_l = J_l ... J_{first} over the selected layers.
* `intervention_damage`: KL(clean || intervened) = sum_v p_c log(p_c / p_i)
  of the next-token distributions at the read-out positions, averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import attention as attention_lib
from kvjax import model as model_lib
from kvjax.cache import init_cache
from kvjax.config import ModelConfig

Array = jax.Array
Params = dict[str, Any]

_TINY = 1e-30  # guards divisions by an all-zero vector's squared norm


# ----------------------------------------------------------------------------
# Shared helpers.


def _token_weights(token_mask, batch: int, length: int) -> Array:
  """[B, T] float32 weights: 1 for counted tokens, 0 for padding."""
  if token_mask is None:
    return jnp.ones((batch, length), jnp.float32)
  if tuple(token_mask.shape) != (batch, length):
    raise ValueError(
      f"token_mask must have shape {(batch, length)}, got "
      f"{tuple(token_mask.shape)}."
    )
  return jnp.asarray(token_mask).astype(bool).astype(jnp.float32)


def _mean_over_tokens(x: Array, w: Array) -> Array:
  """Mean of x [..., B, T] over the tokens weighted by w [B, T] -> [...]."""
  return jnp.sum(x * w, axis=(-2, -1)) / jnp.maximum(jnp.sum(w), 1.0)


def _check_hidden(name: str, x, ndim: int, exact: bool = True):
  """Raises unless x is an array with ndim dims (at least ndim if not exact)."""
  shape = getattr(x, "shape", None)
  if shape is None or (len(shape) != ndim if exact else len(shape) < ndim):
    want = f"{ndim}" if exact else f"at least {ndim}"
    raise ValueError(
      f"{name} must be an array with {want} dims, got "
      f"{shape if shape is not None else type(x).__name__}."
    )


def _rms(x: Array) -> Array:
  """[..., D] -> [...] float32 RMS over the last axis."""
  x = x.astype(jnp.float32)
  return jnp.sqrt(jnp.mean(x * x, axis=-1))


def _sq(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=-1)


def _cos(a: Array, b: Array) -> Array:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(jnp.sqrt(_sq(a) * _sq(b)), _TINY)


def prediction_positions(answer_positions) -> Array:
  """Read-out positions of answers: position - 1, padding (-1) kept at -1.

  Args:
    answer_positions: [B, A] int positions of answer tokens, -1 pad (as in
      `kvjax.tasks.TaskBatch.answer_positions`).

  Returns:
    [B, A] int32 positions whose next-token logits predict each answer.
  """
  answer_positions = jnp.asarray(answer_positions, jnp.int32)
  return jnp.where(answer_positions >= 0, answer_positions - 1, -1)


def _check_readout(positions, targets, batch: int, length: int):
  if positions is None or targets is None or positions.ndim != 2:
    raise ValueError(
      "positions must be a [B, A] int array, got "
      f"{getattr(positions, 'shape', positions)}."
    )
  if tuple(targets.shape) != tuple(positions.shape):
    raise ValueError(
      f"targets shape {tuple(targets.shape)} must equal "
      f"positions shape {tuple(positions.shape)}."
    )
  if positions.shape[0] != batch:
    raise ValueError(
      f"positions has {positions.shape[0]} rows, the hidden "
      f"states have batch {batch}."
    )
  if not isinstance(positions, jax.core.Tracer):
    host = np.asarray(positions)
    if (host >= length).any():
      raise ValueError(
        f"positions must be < T={length} (negative = pad), "
        f"got max {int(host.max())}."
      )


def _gather_positions(x: Array, positions: Array) -> Array:
  """x [..., B, T, X] at positions [B, A] (negative -> 0) -> [..., B, A, X]."""
  idx = jnp.where(positions >= 0, positions, 0).astype(jnp.int32)
  idx = jnp.broadcast_to(idx[..., None], idx.shape + (x.shape[-1],))
  idx = jnp.broadcast_to(idx, x.shape[:-3] + idx.shape)
  return jnp.take_along_axis(x, idx, axis=-2)


def _readout_stats(logits: Array, targets: Array, valid: Array):
  """Per leading index: accuracy, mean entropy, mean target log-prob.

  logits [..., B, A, V] float32; targets, valid [B, A].
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  pred = jnp.argmax(logp, axis=-1).astype(jnp.int32)  # [..., B, A]
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  tgt = jnp.where(valid, targets, 0).astype(jnp.int32)
  tgt = jnp.broadcast_to(tgt, logp.shape[:-1])
  target_logp = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  w = valid.astype(jnp.float32)
  correct = (pred == tgt).astype(jnp.float32)
  return (
    _mean_over_tokens(correct, w),
    _mean_over_tokens(entropy, w),
    _mean_over_tokens(target_logp, w),
    jnp.where(valid, pred, -1),
  )


# ----------------------------------------------------------------------------
# Norms and writes.


class NormGrowth(NamedTuple):
  """Residual RMS per layer.

  Attributes:
    rms: [L + 1] mean per-token RMS of x_0 .. x_L (x_L = final hidden).
    growth: [L] rms[l + 1] / rms[l].
  """

  rms: Array
  growth: Array


def norm_growth(
  resid: Array, final_hidden: Array, token_mask: Array | None = None
) -> NormGrowth:
  """Mean residual RMS entering each layer and after the last, and growth.

  Args:
    resid: [L, B, T, D] residual entering each layer (capture "resid").
    final_hidden: [B, T, D] residual after the last layer.
    token_mask: optional [B, T] bool, True for tokens to average over.

  Returns:
    A `NormGrowth`.

  Raises:
    ValueError: for mis-shaped inputs.
  """
  _check_hidden("resid", resid, 4)
  if tuple(final_hidden.shape) != tuple(resid.shape[1:]):
    raise ValueError(
      f"final_hidden must have shape {tuple(resid.shape[1:])},"
      f" got {tuple(final_hidden.shape)}."
    )
  _, B, T, _ = resid.shape
  return _norm_growth(resid, final_hidden, _token_weights(token_mask, B, T))


@jax.jit
def _norm_growth(resid, final_hidden, w) -> NormGrowth:
  rms = jnp.concatenate(
    [
      _mean_over_tokens(_rms(resid), w),
      _mean_over_tokens(_rms(final_hidden), w)[None],
    ]
  )
  return NormGrowth(rms=rms, growth=rms[1:] / jnp.maximum(rms[:-1], _TINY))


class WriteStats(NamedTuple):
  """Attention and MLP writes into the residual, per layer ([L] each).

  Attributes:
    resid_rms: mean RMS of x_l.
    attn_rms: mean RMS of the attention write a_l.
    mlp_rms: mean RMS of the MLP write m_l.
    attn_energy: mean ||a_l||^2 / ||x_l||^2.
    mlp_energy: mean ||m_l||^2 / ||x_l + a_l||^2.
    attn_cos: mean cos(a_l, x_l).
    mlp_cos: mean cos(m_l, x_l + a_l).
  """

  resid_rms: Array
  attn_rms: Array
  mlp_rms: Array
  attn_energy: Array
  mlp_energy: Array
  attn_cos: Array
  mlp_cos: Array


def write_stats(
  resid: Array, attn_out: Array, mlp_out: Array, token_mask: Array | None = None
) -> WriteStats:
  """Norms, energy shares and alignment of each layer's two writes.

  Each write is compared with the residual it is added to: the attention
  write with x_l, the MLP write with x_l + a_l.

  Args:
    resid: [L, B, T, D] residual entering each layer.
    attn_out: [L, B, T, D] attention writes.
    mlp_out: [L, B, T, D] MLP writes.
    token_mask: optional [B, T] bool, True for tokens to average over.

  Returns:
    A `WriteStats` of [L] arrays.

  Raises:
    ValueError: for mis-shaped inputs.
  """
  _check_hidden("resid", resid, 4)
  for name, x in (("attn_out", attn_out), ("mlp_out", mlp_out)):
    if tuple(x.shape) != tuple(resid.shape):
      raise ValueError(
        f"{name} must have shape {tuple(resid.shape)} like "
        f"resid, got {tuple(x.shape)}."
      )
  _, B, T, _ = resid.shape
  return _write_stats(
    resid, attn_out, mlp_out, _token_weights(token_mask, B, T)
  )


@jax.jit
def _write_stats(resid, attn_out, mlp_out, w) -> WriteStats:
  mean = lambda x: _mean_over_tokens(x, w)
  x = resid.astype(jnp.float32)
  a = attn_out.astype(jnp.float32)
  m = mlp_out.astype(jnp.float32)
  mid = x + a  # [L, B, T, D] residual the MLP writes into
  return WriteStats(
    resid_rms=mean(_rms(x)),
    attn_rms=mean(_rms(a)),
    mlp_rms=mean(_rms(m)),
    attn_energy=mean(_sq(a) / jnp.maximum(_sq(x), _TINY)),
    mlp_energy=mean(_sq(m) / jnp.maximum(_sq(mid), _TINY)),
    attn_cos=mean(_cos(a, x)),
    mlp_cos=mean(_cos(m, mid)),
  )


# ----------------------------------------------------------------------------
# Logit lens.


class LogitLens(NamedTuple):
  """Each layer's residual read through the final norm and LM head.

  Row l is x_l (row 0: the embeddings), row L the final hidden state, which
  reproduces the model's own logits.

  Attributes:
    accuracy: [L + 1] share of read-out positions whose argmax is the target.
    entropy: [L + 1] mean entropy (nats) of the read-out distributions.
    target_logprob: [L + 1] mean log-probability of the target.
    predictions: [L + 1, B, A] int32 argmax ids, -1 at padding.
  """

  accuracy: Array
  entropy: Array
  target_logprob: Array
  predictions: Array


def logit_lens(
  params: Params,
  config: ModelConfig,
  resid: Array,
  final_hidden: Array,
  positions: Array,
  targets: Array,
) -> LogitLens:
  """Logit lens: next-token accuracy and entropy of every layer's residual.

  Args:
    params: model parameters (final_norm and lm_head / embed are read).
    config: the model config.
    resid: [L, B, T, D] residual entering each layer.
    final_hidden: [B, T, D] residual after the last layer.
    positions: [B, A] int hidden-state positions to read (negative = pad);
      for answers use `prediction_positions(answer_positions)`.
    targets: [B, A] int target token ids.

  Returns:
    A `LogitLens`.

  Raises:
    ValueError: for mis-shaped inputs or positions >= T.
  """
  _check_hidden("resid", resid, 4)
  if tuple(final_hidden.shape) != tuple(resid.shape[1:]):
    raise ValueError(
      f"final_hidden must have shape {tuple(resid.shape[1:])},"
      f" got {tuple(final_hidden.shape)}."
    )
  L, B, T, D = resid.shape
  if L != config.num_layers or D != config.d_model:
    raise ValueError(
      f"resid [L={L}, D={D}] does not match the config "
      f"(L={config.num_layers}, D={config.d_model})."
    )
  positions, targets = jnp.asarray(positions), jnp.asarray(targets)
  _check_readout(positions, targets, B, T)
  return _logit_lens(
    params, resid, final_hidden, positions, targets, config=config
  )


@functools.partial(jax.jit, static_argnames="config")
def _logit_lens(params, resid, final_hidden, positions, targets, *, config):
  hidden = jnp.concatenate([resid, final_hidden[None]])  # [L+1, B, T, D]
  h = _gather_positions(hidden, positions)  # [L+1, B, A, D]
  h = model_lib.rms_norm(h, params["final_norm"], config.norm_eps)
  logits = model_lib.unembed(params, config, h)  # [L+1, B, A, V]
  acc, ent, tlp, pred = _readout_stats(logits, targets, positions >= 0)
  return LogitLens(
    accuracy=acc, entropy=ent, target_logprob=tlp, predictions=pred
  )


# ----------------------------------------------------------------------------
# Near-null space of the LM head.


def lm_head_spectrum(
  params: Params, config: ModelConfig, *, fold_final_norm: bool = True
) -> tuple[Array, Array]:
  """SVD of the V x D unembedding W (logits = W h): singular values, V^T.

  Computed as the SVD of R from W = QR (D x D work after one QR), in
  float32. With `fold_final_norm` the final RMSNorm weight g is folded in
  (W diag(g)), the map a hidden direction actually goes through.

  Args:
    params: model parameters.
    config: the model config.
    fold_final_norm: fold the final norm weight into W.

  Returns:
    singular_values: [D] float32, descending (zeros past rank V if V < D).
    right_vectors: [D, D] float32; row i is the right-singular vector of
      singular value i.
  """
  if config.tie_embeddings:
    w = params["embed"]  # [V, D]
  else:
    w = params["lm_head"].T  # [V, D]
  g = params["final_norm"] if fold_final_norm else None
  return _spectrum(w, g)


@jax.jit
def _spectrum(w, g):
  w = w.astype(jnp.float32)
  if g is not None:
    w = w * g.astype(jnp.float32)[None, :]
  D = w.shape[1]
  r = jnp.linalg.qr(w, mode="r")  # [min(V, D), D]
  _, s, vh = jnp.linalg.svd(r, full_matrices=True)  # s [min(V, D)], vh [D, D]
  s = jnp.pad(s, (0, D - s.shape[0]))
  return s, vh


class NullSpaceEnergy(NamedTuple):
  """Hidden-state energy in the LM head's near-null space.

  Attributes:
    energy: [...] mean per-token share ||P h||^2 / ||h||^2 (one per layer
      for [L, B, T, D] input, a scalar for [B, T, D]).
    k: dimension of the near-null space.
    baseline: k / D, the expected share of an isotropic random vector.
    singular_values: [D] singular values of the unembedding, descending;
      the near-null space belongs to the last k.
  """

  energy: Array
  k: int
  baseline: float
  singular_values: Array


def null_space_energy(
  params: Params,
  config: ModelConfig,
  hidden: Array,
  *,
  k: int | None = None,
  fraction: float | None = None,
  token_mask: Array | None = None,
  fold_final_norm: bool = True,
) -> NullSpaceEnergy:
  """Share of hidden-state energy the LM head (nearly) cannot see.

  The near-null space is the span of the k right-singular vectors of the
  V x D unembedding (see `lm_head_spectrum`) with the smallest singular
  values. Give exactly one of `k` or `fraction` (k = max(1, round(fraction
  * D))).

  Args:
    params: model parameters.
    config: the model config.
    hidden: [..., B, T, D] hidden states, e.g. resid [L, B, T, D] or
      final_hidden [B, T, D].
    k: dimension of the near-null space, 1 <= k <= D.
    fraction: k as a fraction of D, in (0, 1].
    token_mask: optional [B, T] bool, True for tokens to average over.
    fold_final_norm: fold the final RMSNorm weight into the LM head.

  Returns:
    A `NullSpaceEnergy`; `energy` has shape hidden.shape[:-3].

  Raises:
    ValueError: for a bad k / fraction or mis-shaped hidden states.
  """
  _check_hidden("hidden", hidden, 3, exact=False)
  D = config.d_model
  if hidden.shape[-1] != D:
    raise ValueError(
      f"hidden has feature size {hidden.shape[-1]}, the config has d_model={D}."
    )
  if (k is None) == (fraction is None):
    raise ValueError(
      f"give exactly one of k or fraction, got k={k!r}, fraction={fraction!r}."
    )
  if fraction is not None:
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    k = max(1, int(round(fraction * D)))
  if not isinstance(k, (int, np.integer)) or not 1 <= k <= D:
    raise ValueError(f"k must be an int in [1, {D}], got {k!r}.")
  s, vh = lm_head_spectrum(params, config, fold_final_norm=fold_final_norm)
  w = _token_weights(token_mask, *hidden.shape[-3:-1])
  energy = _projected_share(hidden, vh, w, k=int(k))
  return NullSpaceEnergy(
    energy=energy, k=int(k), baseline=k / D, singular_values=s
  )


@functools.partial(jax.jit, static_argnames="k")
def _projected_share(hidden, vh, w, *, k):
  """Mean share of hidden [..., B, T, D] in the span of vh's last k rows."""
  h = hidden.astype(jnp.float32)
  coef = jnp.einsum("...d,kd->...k", h, vh[vh.shape[0] - k :])
  share = _sq(coef) / jnp.maximum(_sq(h), _TINY)  # [..., B, T]
  return _mean_over_tokens(share, w)


# ----------------------------------------------------------------------------
# Spectral (DCT) compressibility.

DCT_AXES = ("tokens", "features", "both")


class DctCompressibility(NamedTuple):
  """Energy kept by the top-k DCT-II coefficients of each fiber.

  Attributes:
    fractions: [F] the requested keep fractions.
    kept: [F] int coefficients kept per fiber.
    energy: [..., F] kept energy / total energy (leading axes of hidden
      before [B, T, D], e.g. one row per layer).
  """

  fractions: np.ndarray
  kept: np.ndarray
  energy: Array


def dct_compressibility(
  hidden: Array,
  axis: str = "tokens",
  keep_fractions: float | Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5),
  token_mask: Array | None = None,
) -> DctCompressibility:
  """How much energy a few orthonormal DCT-II coefficients capture.

  Args:
    hidden: [..., B, T, D] hidden states.
    axis: "tokens" (each channel over the T tokens of a row), "features"
      (each token's D features) or "both" (2-D DCT of each row's [T, D]).
    keep_fractions: a fraction or a sequence of fractions in (0, 1] of the
      n coefficients per fiber to keep (k = max(1, round(f * n))).
    token_mask: optional [B, T] bool; masked tokens are set to zero first
      (they then add no energy; along "tokens" the zeros stay in the
      sequence, so pass unpadded rows for a clean token-axis measurement).

  Returns:
    A `DctCompressibility` with energy [..., F].

  Raises:
    ValueError: for an unknown axis, bad fractions or mis-shaped input.
  """
  _check_hidden("hidden", hidden, 3, exact=False)
  if axis not in DCT_AXES:
    raise ValueError(f"axis must be one of {DCT_AXES}, got {axis!r}.")
  fractions = np.atleast_1d(np.asarray(keep_fractions, np.float64))
  if (
    fractions.ndim != 1
    or fractions.size == 0
    or not np.all((fractions > 0) & (fractions <= 1))
  ):
    raise ValueError(
      f"keep_fractions must be in (0, 1], got {keep_fractions!r}."
    )
  *_, B, T, D = hidden.shape
  n = {"features": D, "tokens": T, "both": T * D}[axis]
  kept = np.clip(np.round(fractions * n).astype(np.int64), 1, n)
  energy = _dct_energy(
    hidden,
    _token_weights(token_mask, B, T),
    axis=axis,
    kept=tuple(int(k) for k in kept),
  )
  return DctCompressibility(fractions=fractions, kept=kept, energy=energy)


@functools.partial(jax.jit, static_argnames=("axis", "kept"))
def _dct_energy(hidden, w, *, axis, kept):
  *_, T, D = hidden.shape
  x = hidden.astype(jnp.float32) * w[..., None]
  if axis == "features":
    c = jax.scipy.fft.dct(x, type=2, axis=-1, norm="ortho")  # [..., B, T, D]
  elif axis == "tokens":
    c = jax.scipy.fft.dct(x, type=2, axis=-2, norm="ortho")
    c = jnp.swapaxes(c, -2, -1)  # [..., B, D, T]: fibers last
  else:
    c = jax.scipy.fft.dctn(x, type=2, axes=(-2, -1), norm="ortho")
    c = c.reshape(c.shape[:-2] + (1, T * D))  # [..., B, 1, T*D]
  e = -jnp.sort(-(c * c), axis=-1)  # [..., fibers, n] descending energies
  cum = jnp.cumsum(e, axis=-1)
  kept_energy = jnp.sum(cum[..., np.asarray(kept) - 1], axis=(-3, -2))
  total = jnp.sum(cum[..., -1], axis=(-2, -1))[..., None]  # [..., 1]
  return kept_energy / jnp.maximum(total, _TINY)  # [..., F]


# ----------------------------------------------------------------------------
# Local Jacobians of the decoder layers.

JACOBIAN_BLOCKS = ("full", "last")


class LayerJacobians(NamedTuple):
  """Local Jacobians J_l = d x_{l+1} / d x_l and their spectra (numpy).

  Attributes:
    layers: the layers analysed, in order.
    jacobians: [n, M, M] float32 matrices (M = T*D for block "full", D for
      "last"); None unless `return_matrices`.
    eigenvalues: [n, num_eigenvalues] complex128, largest modulus first.
    spectral_radius: [n] max |lambda|.
    spectral_norm: [n] largest singular value.
    henrici: [n] Henrici departure from normality, in [0, 1].
    effective_rank: [n] effective rank of J_l.
    product_effective_rank: [n] effective rank of J_l ... J_{layers[0]}.
  """

  layers: tuple[int, ...]
  jacobians: np.ndarray | None
  eigenvalues: np.ndarray
  spectral_radius: np.ndarray
  spectral_norm: np.ndarray
  henrici: np.ndarray
  effective_rank: np.ndarray
  product_effective_rank: np.ndarray


def effective_rank(singular_values) -> float:
  """exp of the entropy of the normalized singular values (Roy & Vetterli).

  Args:
    singular_values: [M] non-negative values.

  Returns:
    A float in [1, M] (0 for an all-zero input).
  """
  s = np.asarray(singular_values, np.float64)
  total = s.sum()
  if total <= 0:
    return 0.0
  p = s[s > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def henrici_departure(matrix, eigenvalues=None) -> float:
  """sqrt(max(||J||_F^2 - sum |lambda|^2, 0)) / ||J||_F, 0 when normal."""
  j = np.asarray(matrix, np.float64)
  lam = np.linalg.eigvals(j) if eigenvalues is None else eigenvalues
  fro2 = float(np.sum(j * j))
  if fro2 == 0:
    return 0.0
  return float(np.sqrt(max(fro2 - float(np.sum(np.abs(lam) ** 2)), 0.0) / fro2))


def block_triangular_eigvals(matrix, block: int) -> np.ndarray:
  """Eigenvalues of a matrix, via its diagonal blocks when block triangular.

  A causal layer's (T*D) x (T*D) Jacobian is block lower triangular in
  D x D token blocks, so its eigenvalues are those of the T diagonal blocks:
  T eigenproblems of size D instead of one of size T*D (T^2 times cheaper,
  and better conditioned). Falls back to the whole matrix when any block
  above the diagonal is non-zero.

  Args:
    matrix: [M, M] with M a multiple of `block`.
    block: the block size (D).

  Returns:
    [M] complex eigenvalues (unsorted).
  """
  j = np.asarray(matrix)
  n = j.shape[0] // block
  upper = np.triu(np.ones((n, n), bool), 1)
  if n * block != j.shape[0] or np.any(
    j.reshape(n, block, n, block)[upper.nonzero()[0], :, upper.nonzero()[1], :]
  ):
    return np.linalg.eigvals(j)
  return np.concatenate(
    [
      np.linalg.eigvals(
        j[t * block : (t + 1) * block, t * block : (t + 1) * block]
      )
      for t in range(n)
    ]
  )


@functools.partial(jax.jit, static_argnames="config")
def _residuals(params, tokens, *, config):
  """[L, 1, T, D] residual entering each layer."""
  _, _, aux = model_lib.forward(
    params,
    tokens,
    init_cache(config, 1, tokens.shape[1]),
    config=config,
    capture=("resid",),
  )
  return aux["resid"]


@functools.partial(jax.jit, static_argnames=("config", "block"))
def _layer_jacobian(layers, l, resid, *, config, block):
  """J of decoder layer l (traced) at resid[l] [1, T, D], in float32."""
  p = jax.tree.map(lambda a: a[l].astype(jnp.float32), layers)
  x = resid[l].astype(jnp.float32)
  _, T, D = x.shape
  empty = init_cache(config, 1, T, dtype=jnp.float32)
  layer_cache = (empty.k, empty.v, empty.pos, empty.valid)
  positions = jnp.arange(T, dtype=jnp.int32)[None]  # [1, T]
  inv_freq = model_lib.rope_inv_freq(config)

  def layer(x):  # [1, T, D] -> [1, T, D]
    y, _, _ = model_lib.decoder_layer(
      x,
      p,
      layer_cache,
      positions=positions,
      slots=positions,
      config=config,
      inv_freq=inv_freq,
      backend="xla",
      capture=(),
      layer=l,
    )
    return y

  if block == "full":
    return jax.jacfwd(layer)(x).reshape(T * D, T * D)
  last = lambda v: layer(x.at[:, -1].set(v[None]))[0, -1]  # [D] -> [D]
  return jax.jacfwd(last)(x[0, -1])


def layer_jacobians(
  params: Params,
  config: ModelConfig,
  tokens: Array,
  layers: Sequence[int] | None = None,
  *,
  block: str = "full",
  num_eigenvalues: int = 8,
  return_matrices: bool = True,
) -> LayerJacobians:
  """Local Jacobians of decoder layers on a short input, with spectra.

  The residual entering each layer comes from one `forward` pass (in the
  model's dtype); each layer is then differentiated with `jax.jacfwd`
  through `kvjax.model.decoder_layer` in float32 on an empty cache of
  capacity T. Cost: M = T*D columns per layer and an O(M^3) eigen/singular
  decomposition on the host, so keep T*D to a few thousand (block "last"
  needs only M = D).

  Args:
    params: model parameters.
    config: the model config.
    tokens: [1, T] or [T] int tokens (T small, e.g. 8).
    layers: increasing layer indices to analyse (default: all). Products
      run over these in order; for contiguous layers a..b the product is
      the end-to-end Jacobian d x_{b+1} / d x_a.
    block: "full" for the (T*D) x (T*D) Jacobian, "last" for the D x D
      block of the last token's output w.r.t. its own input (the product of
      such blocks is the last diagonal block of the full product, because
      the full Jacobians are block lower triangular).
    num_eigenvalues: how many eigenvalues (largest modulus) to keep.
    return_matrices: also return the Jacobians.

  Returns:
    A `LayerJacobians` of numpy arrays.

  Raises:
    ValueError: for bad tokens, layers, block or num_eigenvalues.
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[None]
  if tokens.ndim != 2 or tokens.shape[0] != 1:
    raise ValueError(
      f"tokens must have shape [T] or [1, T], got {tuple(tokens.shape)}."
    )
  if block not in JACOBIAN_BLOCKS:
    raise ValueError(f"block must be one of {JACOBIAN_BLOCKS}, got {block!r}.")
  L = config.num_layers
  layers = tuple(range(L)) if layers is None else tuple(int(l) for l in layers)
  if (
    not layers
    or any(not 0 <= l < L for l in layers)
    or any(b <= a for a, b in zip(layers, layers[1:]))
  ):
    raise ValueError(
      f"layers must be increasing indices in [0, {L}), got {layers!r}."
    )
  T = tokens.shape[1]
  M = T * config.d_model if block == "full" else config.d_model
  if not isinstance(num_eigenvalues, int) or not 1 <= num_eigenvalues <= M:
    raise ValueError(
      f"num_eigenvalues must be an int in [1, {M}], got {num_eigenvalues!r}."
    )
  resid = _residuals(params, tokens, config=config)
  f32 = config.replace(dtype="float32")
  mats, eigs, radius, snorm, henrici, erank, prank = [], [], [], [], [], [], []
  product = None
  for l in layers:
    j = _layer_jacobian(
      params["layers"], jnp.int32(l), resid, config=f32, block=block
    )
    j = np.asarray(j, np.float64)
    lam = block_triangular_eigvals(j, config.d_model)
    lam = lam[np.argsort(-np.abs(lam), kind="stable")]
    s = np.linalg.svd(j, compute_uv=False)
    product = j if product is None else j @ product
    if return_matrices:
      mats.append(j.astype(np.float32))
    eigs.append(lam[:num_eigenvalues].astype(np.complex128))
    radius.append(float(np.abs(lam[0])))
    snorm.append(float(s[0]))
    henrici.append(henrici_departure(j, lam))
    erank.append(effective_rank(s))
    prank.append(effective_rank(np.linalg.svd(product, compute_uv=False)))
  return LayerJacobians(
    layers=layers,
    jacobians=np.stack(mats) if return_matrices else None,
    eigenvalues=np.stack(eigs),
    spectral_radius=np.array(radius),
    spectral_norm=np.array(snorm),
    henrici=np.array(henrici),
    effective_rank=np.array(erank),
    product_effective_rank=np.array(prank),
  )


# ----------------------------------------------------------------------------
# Interventions on the writes.

WRITE_KINDS = {"attn": "attn_out", "mlp": "mlp_out"}
INTERVENTION_MODES = ("ablate", "rotate", "scale", "noise")


def random_rotation(rng: Array, dim: int) -> Array:
  """A Haar-random [dim, dim] float32 orthogonal matrix (QR, sign-fixed)."""
  g = jax.random.normal(rng, (dim, dim), jnp.float32)
  q, r = jnp.linalg.qr(g)
  return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]


def intervene_writes(
  kind: str,
  layer: int | Sequence[int] | None = None,
  mode: str = "ablate",
  scale: float = 1.0,
  rng: Array | int | None = None,
) -> model_lib.Intervene:
  """Builds an `intervene` callable for `kvjax.model.forward`.

  Modes, applied per token to the write w [D] of the chosen kind at the
  chosen layers:
    "ablate": w -> 0.
    "rotate": w -> w R with one fixed Haar-random orthogonal R (from `rng`),
      so every token's write keeps its norm and only its direction changes.
    "scale": w -> scale * w.
    "noise": w -> w + scale * ||w|| * u, u a random unit vector (drawn from
      `rng` folded with the layer index; the same on every call), so the
      added noise has exactly `scale` times the write's norm.

  Args:
    kind: "attn" or "mlp".
    layer: a layer index, a sequence of them, or None for every layer.
    mode: one of `INTERVENTION_MODES`.
    scale: the factor for "scale" and "noise".
    rng: a PRNG key or int seed; required for "rotate" and "noise".

  Returns:
    intervene(layer, name, value) -> value; pass it as `intervene=` to
    `forward`. A new callable per call, so under `jit` (static argument)
    reuse one object to avoid recompiling.

  Raises:
    ValueError: for an unknown kind or mode, bad layers or scale, or a
      missing rng.
  """
  if kind not in WRITE_KINDS:
    raise ValueError(f"kind must be one of {tuple(WRITE_KINDS)}, got {kind!r}.")
  if mode not in INTERVENTION_MODES:
    raise ValueError(f"mode must be one of {INTERVENTION_MODES}, got {mode!r}.")
  if not isinstance(scale, (int, float)) or not np.isfinite(scale):
    raise ValueError(f"scale must be a finite number, got {scale!r}.")
  if layer is None:
    layers = None
  else:
    layers = (layer,) if isinstance(layer, (int, np.integer)) else tuple(layer)
    if not layers or any(
      not isinstance(l, (int, np.integer)) or l < 0 for l in layers
    ):
      raise ValueError(
        f"layer must be None, an int >= 0 or a non-empty "
        f"sequence of them, got {layer!r}."
      )
  if mode in ("rotate", "noise"):
    if rng is None:
      raise ValueError(f"mode={mode!r} needs an rng (PRNG key or int seed).")
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(int(rng))
  target = WRITE_KINDS[kind]
  rotations = {}  # dim -> concrete rotation, built once outside any trace

  def rotation(dim):
    if dim not in rotations:
      with jax.ensure_compile_time_eval():
        rotations[dim] = random_rotation(rng, dim)
    return rotations[dim]

  def intervene(layer_index, name, value):
    if name != target:
      return value
    w = value.astype(jnp.float32)  # [B, T, D]
    if mode == "ablate":
      new = jnp.zeros_like(w)
    elif mode == "scale":
      new = scale * w
    elif mode == "rotate":
      new = w @ rotation(w.shape[-1])
    else:
      if layer_index is None:
        raise ValueError("mode='noise' needs the layer index.")
      u = jax.random.normal(jax.random.fold_in(rng, layer_index), w.shape)
      u = u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), _TINY)
      new = w + scale * jnp.linalg.norm(w, axis=-1, keepdims=True) * u
    new = new.astype(value.dtype)
    if layers is None:
      return new
    if layer_index is None:
      raise ValueError(
        "intervene_writes(layer=...) needs the layer index; "
        "decoder_layer was called without `layer`."
      )
    chosen = jnp.any(jnp.asarray(layer_index) == jnp.asarray(layers))
    return jnp.where(chosen, new, value)

  return intervene


class InterventionDamage(NamedTuple):
  """Clean vs intervened next-token predictions at the read-out positions.

  Attributes:
    kl: mean KL(clean || intervened) in nats.
    clean_accuracy: argmax accuracy of the clean model.
    intervened_accuracy: argmax accuracy with the intervention.
    agreement: share of positions whose argmax is unchanged.
  """

  kl: Array
  clean_accuracy: Array
  intervened_accuracy: Array
  agreement: Array


@functools.partial(jax.jit, static_argnames=("config", "intervene"))
def _logits(params, tokens, token_mask, *, config, intervene):
  B, T = tokens.shape
  logits, _, _ = model_lib.forward(
    params,
    tokens,
    init_cache(config, B, T),
    config=config,
    token_mask=token_mask,
    intervene=intervene,
  )
  return logits


def intervention_damage(
  params: Params,
  config: ModelConfig,
  tokens: Array,
  intervene: model_lib.Intervene,
  positions: Array,
  targets: Array,
  token_mask: Array | None = None,
) -> InterventionDamage:
  """How much an intervention changes the next-token predictions.

  Args:
    params: model parameters.
    config: the model config.
    tokens: [B, T] int tokens.
    intervene: an `intervene` callable (e.g. from `intervene_writes`).
    positions: [B, A] int read-out positions (negative = pad); for answers
      use `prediction_positions(answer_positions)`.
    targets: [B, A] int target ids.
    token_mask: optional [B, T] bool, False for padding tokens.

  Returns:
    An `InterventionDamage` of scalars.

  Raises:
    ValueError: for mis-shaped inputs.
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(
      f"tokens must have shape [B, T], got {tuple(tokens.shape)}."
    )
  if not callable(intervene):
    raise TypeError(
      f"intervene must be callable, got {type(intervene).__name__}."
    )
  B, T = tokens.shape
  positions, targets = jnp.asarray(positions), jnp.asarray(targets)
  _check_readout(positions, targets, B, T)
  mask = (
    jnp.ones((B, T), bool)
    if token_mask is None
    else jnp.asarray(token_mask, bool)
  )
  clean = _logits(params, tokens, mask, config=config, intervene=None)
  hit = _logits(params, tokens, mask, config=config, intervene=intervene)
  return _damage(clean, hit, positions, targets)


@jax.jit
def _damage(clean, hit, positions, targets) -> InterventionDamage:
  valid = positions >= 0
  pair = _gather_positions(jnp.stack([clean, hit]), positions)  # [2, B, A, V]
  acc, _, _, pred = _readout_stats(pair, targets, valid)
  logp = jax.nn.log_softmax(pair, axis=-1)
  kl = jnp.sum(jnp.exp(logp[0]) * (logp[0] - logp[1]), axis=-1)  # [B, A]
  w = valid.astype(jnp.float32)
  return InterventionDamage(
    kl=_mean_over_tokens(kl, w),
    clean_accuracy=acc[0],
    intervened_accuracy=acc[1],
    agreement=_mean_over_tokens((pred[0] == pred[1]).astype(jnp.float32), w),
  )
