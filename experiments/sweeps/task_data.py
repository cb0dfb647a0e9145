"""One task's rows and everything every unit of the task compares to.

`TaskData` draws a suite entry's rows, puts them in the model's tokens
(`tokens.prepare`: the private ids, or the rows as text in the
checkpoint's vocabulary), prefills the context once (every unit
compresses that cache), runs the uncompressed question (the reference
logits, what a question-aware transform observes, the oracle's future
attention mass) and the prefill's token-attention graph.

Every position and length is read off the prepared batch, never off the
config: on text the context is `batch.context_end` tokens (as many as
the tokenizer gives, equal in every row), the answers, critical
positions and question span are the tokenized batch's (mapped through
the tokens' offsets) and abstention is `unknown_id`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from experiments.sweeps import tokens as tokens_lib
import kvjax
from kvjax import model as model_lib
from kvjax import parallel
from kvjax.analysis import graph as graph_lib
from kvjax.analysis import support as support_lib
from kvjax import attention as attention_lib
from kvjax import ingest
from kvjax.attention import resolve_backend
from kvjax.tasks import generators
from kvjax.tasks import suite

# What every transform may observe of the context's prefill.
_OBSERVED = ("q", "q_pre_rope", "attn_mass")


@functools.partial(
  jax.jit, static_argnames=("config", "capture", "backend", "write_gate")
)
def _question(
  params,
  cache,
  question,
  mask,
  cache_utility=None,
  *,
  config,
  backend,
  capture=("attn_probs",),
  write_gate=None,
):
  """Teacher-forced question on a (compressed) cache, with attention."""
  logits, cache, aux = model_lib.forward(
    params,
    question,
    cache,
    config=config,
    token_mask=mask,
    capture=capture,
    backend=backend,
    write_gate=write_gate,
    cache_utility=cache_utility,
  )
  return logits, aux, cache.pos, cache.valid, cache.end


def ask(
  params,
  cache,
  question,
  mask,
  *,
  config,
  backend,
  capture=("attn_probs",),
  write_gate=None,
  cache_utility=None,
):
  """The question teacher-forced on `cache`: (logits [B, Tq, V], the
  captures, cache.pos, cache.valid) after it. A learned method's question
  runs under its `write_gate`, the cached entries biased by their
  `cache_utility` (`kvjax.compress.spkv.cache_utility`; the reference
  backend), as one gated pass over context and question would.

  Raises:
    ValueError: the question did not fit into the cache (under jit the
      writes past capacity would be dropped: the question lost).
  """
  # On the host (gathered from every process under a multi-process mesh).
  logits, aux, pos, valid, end = parallel.to_host(
    _question(
      params,
      cache,
      question,
      mask,
      cache_utility,
      config=config,
      backend=attention_lib.Backend.REFERENCE if write_gate else backend,
      capture=capture,
      write_gate=write_gate,
    )
  )
  most = int(np.max(np.asarray(end)))
  if most > cache.capacity:
    raise ValueError(
      f"the question needs {most} cache slots, the compressed "
      f"cache has {cache.capacity}: the transform did not "
      "honour its reserve."
    )
  return logits, aux, pos, valid


@functools.partial(jax.jit, static_argnames=("config", "capacity", "backend"))
def _prefill(params, context, *, config, capacity, backend):
  """The uncompressed prefill and what every transform may observe."""
  cache = kvjax.init_cache(config, context.shape[0], capacity)
  _, cache, aux = model_lib.forward(
    params, context, cache, config=config, capture=_OBSERVED, backend=backend
  )
  return cache, aux


@functools.partial(jax.jit, static_argnames=("config", "passes", "backend"))
def _reread_prefill(params, context, *, config, passes, backend):
  """The context read `passes` times in one causal prefill (`kvjax.ingest`):
  the cache of every read and the last read's queries."""
  B, L = context.shape
  cache = kvjax.init_cache(config, B, passes * L)
  _, cache, aux = model_lib.forward(
    params,
    jnp.tile(context, (1, passes)),
    cache,
    config=config,
    capture=("q", "q_pre_rope"),
    backend=backend,
  )
  last = {n: x[:, :, (passes - 1) * L :] for n, x in aux.items()}
  return cache, last


@functools.partial(
  jax.jit, static_argnames=("config", "capacity", "write_gate")
)
def _gated_prefill(params, context, *, config, capacity, write_gate):
  """A learned method's prefill: the context under its hard write gate
  (reference backend), with what transforms observe and the utilities."""
  cache = kvjax.init_cache(config, context.shape[0], capacity)
  _, cache, aux = model_lib.forward(
    params,
    context,
    cache,
    config=config,
    capture=_OBSERVED + ("write_utility",),
    write_gate=write_gate,
  )
  return cache, aux


@functools.partial(jax.jit, static_argnames=("config", "capacity", "backend"))
def _prefill_probs(params, tokens, *, config, capacity, backend):
  cache = kvjax.init_cache(config, tokens.shape[0], capacity)
  _, cache, aux = model_lib.forward(
    params,
    tokens,
    cache,
    config=config,
    capture=("attn_probs",),
    backend=backend,
  )
  return aux["attn_probs"], cache.pos, cache.valid


class TaskData:
  """One task's rows and everything every unit of the task compares to.

  Attributes (B rows, L context tokens, Tq question tokens, T = L + Tq):
    batch: the padded `TaskBatch` in the model's ids; name: the suite
      entry.
    source_batch: the generator's batch (private ids).
    text_batch: the `text.TextBatch` the batch came from (tokens "text"),
      else None.
    unknown_id: the id of the abstention answer in `batch`.
    tokens: the sweep's `tokens.Tokens`.
    context [B, L], question [B, Tq]: the tokens.
    qmask [B, Tq]: real (not padding) question tokens.
    observe_mask [B, Tq]: the question proper (no answer, nothing that
      follows from one): what a question-aware transform observes.
    query_pos [B, Tq]: positions of the real question tokens, -1 elsewhere.
    sources [B, A]: rows predicting answers (-1: none); targets: the
      answer-critical context positions.
    cache: the uncompressed prefilled context (capacity T); with
      config.ingest_passes = P > 1 the last of P reads of the context in
      one causal prefill (`kvjax.ingest`: every entry computed after the
      whole context was read once more), its positions offset by
      `offset` = (P - 1) L, the question continuing at P L.
    passes, offset: P and (P - 1) L (1 and 0 for a plain prefill).
    context_observed / question_observed: the captures a transform reads
      in the agnostic / aware mode (with context_pos, context_mask /
      question_pos, observe_mask).
    logits [B, Tq, V]: the uncompressed question's logits.
    future_mass [L, B, N, T]: what the question's real queries pay to each
      slot (the oracle's input).
    prefill_graph: token-attention graph inside the context.
    support [L, B, N, A]: active support of the answer queries.
  """

  def __init__(self, cfg, config, params, name, tokens=None):
    """Draws, prepares and prefills the task `name`.

    Args:
      cfg: the sweep config.
      config, params: the model.
      name: a suite entry.
      tokens: the sweep's `tokens.Tokens` (None: `tokens.load(cfg)`).

    Raises:
      ValueError: rows the model cannot read (`tokens.prepare`), named
        with the task.
    """
    index, entry = suite.suite_entry(name)
    task_params = dict(entry.params)
    if entry.task == "mqar":
      task_params["num_pairs"] = int(cfg.mqar_pairs)
    context_len = int(cfg.context_len)  # task positions (BOS included)
    self.source_batch = generators.make_batch(
      entry.task,
      int(cfg.num_examples),
      seed=(int(cfg.seed), index),
      context_len=context_len,
      **task_params,
    )
    # Every task one shape where it fits (one compiled program); a text
    # batch whose words split into several tokens may be longer.
    width = context_len + 1 + 2 * int(cfg.mqar_pairs)
    self.tokens = tokens if tokens is not None else tokens_lib.load(cfg)
    try:
      self.batch, self.unknown_id, self.text_batch = tokens_lib.prepare(
        self.tokens, self.source_batch, config, width
      )
    except ValueError as e:
      raise ValueError(f"task {name}: {e}") from None
    # The context end of the prepared rows, not cfg.context_len: text
    # rows have as many context tokens as the tokenizer gives.
    L = int(self.batch.context_end[0])
    if np.any(self.batch.context_end != L):
      raise ValueError(
        f"task {name}: rows end their contexts at "
        f"{sorted(set(self.batch.context_end.tolist()))}; "
        "one prefill needs one context length."
      )
    self.name, self.L = name, L
    T = self.batch.tokens.shape[1]
    self.T, self.Tq = T, T - L
    ids = jnp.asarray(self.batch.tokens)
    self.context, self.question = ids[:, :L], ids[:, L:]
    positions = L + np.arange(self.Tq)
    real = positions[None, :] < self.batch.lengths[:, None]  # [B, Tq]
    self.qmask = jnp.asarray(real)
    # The question proper: no answer, nothing that follows from one.
    self.observe_mask = jnp.asarray(generators.question_mask(self.batch)[:, L:])
    self.query_pos = np.where(real, positions[None, :], -1)  # [B, Tq]
    # Rows predicting answers: the input position before each answer.
    valid = self.batch.answer_positions >= 0
    self.sources = np.where(valid, self.batch.answer_positions - 1, -1)
    self.targets = self.batch.critical_positions

    self.config, self.params = config, params
    self.backend = resolve_backend(cfg.backend)
    # One prefill serves every unit: agnostic transforms observe the end of
    # the context, aware ones the question's own queries.
    B = self.context.shape[0]
    self.passes = int(cfg.get("ingest_passes", 1))
    self.offset = (self.passes - 1) * L
    self.context_pos = jnp.broadcast_to(self.offset + jnp.arange(L), (B, L))
    self.context_mask = jnp.ones((B, L), bool)
    if self.passes == 1:
      # Under a mesh that splits the slots: a capacity that splits evenly.
      self.cache, self.context_observed = _prefill(
        params,
        self.context,
        config=config,
        capacity=parallel.mesh.round_up(T, parallel.seq_shards()),
        backend=self.backend,
      )
    else:  # compute before eviction: read P times, keep the last read
      every, self.context_observed = _reread_prefill(
        params,
        self.context,
        config=config,
        passes=self.passes,
        backend=self.backend,
      )
      self.cache = kvjax.compress_cache(
        every,
        ingest.last_read(self.passes),
        config=config,
        observed={},
        positions=jnp.broadcast_to(
          jnp.arange(self.passes * L), (B, self.passes * L)
        ),
        mask=jnp.ones((B, self.passes * L), bool),
        reserve=self.Tq,
      )
    logits, aux, _, _ = ask(
      params,
      self.cache,
      self.question,
      self.qmask,
      config=config,
      backend=self.backend,
      capture=("q", "q_pre_rope", "attn_probs"),
    )
    probs = aux["attn_probs"]
    self.logits = np.asarray(logits)
    self.question_observed = dict(
      q=aux["q"],
      q_pre_rope=aux["q_pre_rope"],
      attn_mass=jnp.einsum(
        "lbnts,bt->lbns", probs, self.observe_mask.astype(jnp.float32)
      ),
    )
    # Live entries of the uncompressed cache (on the host: all processes).
    self.entries = int(np.sum(parallel.to_host(self.cache.valid)))
    # Where the question really is (after the last read).
    self.question_pos = jnp.asarray(np.maximum(self.query_pos, 0) + self.offset)
    # Oracle input: what the question's real queries pay to each slot.
    self.future_mass = jnp.einsum(
      "lbnts,bt->lbns", probs, self.qmask.astype(jnp.float32)
    )
    # None: reachability off (config.reachability; [T, T] per layer), or
    # a re-read context, whose last read's graph reaches into the reads
    # before it (not computed).
    self.prefill_graph = (
      self._prefill_graph(cfg)
      if cfg.get("reachability", True) and self.passes == 1
      else None
    )
    self.support = np.asarray(
      support_lib.active_support(
        self._answer_rows(probs), share=float(cfg.support_share)
      )
    )

  def gated(self, write_gate):
    """(cache, observed) of the context prefilled under a learned method's
    `write_gate` (`kvjax.model.WriteGate`; computed once per gate and
    task): what its units compress, with the "write_utility" capture."""
    if not hasattr(self, "_gated"):
      self._gated = {}
    if write_gate not in self._gated:
      self._gated[write_gate] = _gated_prefill(
        self.params,
        self.context,
        config=self.config,
        capacity=self.cache.capacity,
        write_gate=write_gate,
      )
    return self._gated[write_gate]

  def _answer_rows(self, probs):
    """probs [L, B, N, Tq, S] at the rows predicting answers -> [L,B,N,A,S]."""
    idx = np.maximum(self.sources - self.L, 0)  # [B, A]
    return jnp.take_along_axis(
      probs, jnp.asarray(idx)[None, :, None, :, None], axis=3
    )

  def _prefill_graph(self, cfg, rows: int = 8):
    """Token-attention graph inside the context (full attention), [L,B,T,T]."""
    parts = []
    B = self.context.shape[0]
    for i in range(0, B, rows):
      probs, pos, valid = parallel.to_host(
        _prefill_probs(
          self.params,
          self.context[i : i + rows],
          config=self.config,
          capacity=parallel.mesh.round_up(self.L, parallel.seq_shards()),
          backend=self.backend,
        )
      )
      n = probs.shape[1]
      qpos = np.broadcast_to(np.arange(self.L), (n, self.L))
      parts.append(
        graph_lib.token_graph(
          probs,
          jnp.asarray(qpos),
          pos,
          valid,
          num_positions=self.T,
          eps=float(cfg.graph_eps),
        )
      )
    return jnp.concatenate(parts, axis=1)
