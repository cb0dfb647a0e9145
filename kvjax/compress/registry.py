"""One name per compression method: the table every experiment, benchmark
and test builds transforms from.

A method string names one eviction policy ("snapkv"), one codec ("kivi2"),
or a policy then a codec joined by "+" ("snapkv+kivi2", which builds
`chain(snapkv(ratio), kivi(2))`). Each name is the `.name` of the transform
it builds (a chain's name joins its members' names with "+"), so the method
of a results row is the name of the transform that computed it.

  transform = registry.build("snapkv+kivi2", ratio=0.75)
  registry.POLICY_NAMES  # ("snapkv", "h2o", ...): take a ratio
  registry.CODEC_NAMES   # ("kivi2", "kivi4", ...): take none
  registry.LEARNED_NAMES # ("spkv",): the model's gates decide; take none

A learned method evicts what a model with write gates (SP-KV,
`kvjax-tiny-spkv`) marks as not worth writing: its budget is the model's,
not a ratio, so it is built without one (and composes with a per-entry
codec as a policy does, "spkv+turboquant3"); `capacity` sets its static
head budget.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Mapping

from kvjax import model as model_lib
from kvjax.compress import base
from kvjax.compress import codecs
from kvjax.compress import policies
from kvjax.compress import range_search
from kvjax.compress import rotated
from kvjax.compress import model_aware
from kvjax.compress import rewrite
from kvjax.compress import scorers
from kvjax.compress import structure
from kvjax.compress.spkv import spkv as spkv_gate

SEPARATOR = "+"  # "policy+codec"

# Eviction policies: name -> (ratio, the share of entries removed) ->
# transform.
POLICIES: Mapping[str, Callable[[float], base.KVTransform]] = (
  types.MappingProxyType(
    {
      "snapkv": policies.snapkv,
      "h2o": policies.h2o,
      "streaming_llm": policies.streaming_llm,
      "tova": policies.tova,
      "adakv_snapkv": lambda ratio: policies.adakv("snapkv", ratio),
      "pyramidkv": policies.pyramidkv,
      "knorm": policies.knorm,
      "expected_attention": policies.expected_attention,
      "random": policies.random,
      "oracle": policies.oracle,  # needs the `future_mass` extra input
      # The rest of NVIDIA kvpress' presses (`KVPRESS_NAMES`).
      **scorers.METHODS,
      **structure.METHODS,
      **model_aware.METHODS,
      **rewrite.METHODS,
    }
  )
)
# Codecs: name -> () -> transform (the bits are part of the name).
CODECS: Mapping[str, Callable[[], base.KVTransform]] = types.MappingProxyType(
  {
    "kivi2": lambda: codecs.kivi(2),
    "kivi4": lambda: codecs.kivi(4),
    "int4": lambda: codecs.uniform(4),
    "fp8": codecs.fp8,
    "turboquant2": lambda: rotated.turboquant(2),
    "turboquant3": lambda: rotated.turboquant(3),
    "qjl": rotated.qjl,
    "polarquant": rotated.polarquant,
    "lowrank16": lambda: codecs.lowrank(16),
    # Range search (Louver's idea): every key with q.k >= tau, tau the
    # reservoir's score at this share of keys, plus the newest 32 entries
    # in full precision (Louver's 256 is ~3% of its 8k+ contexts; 32 is
    # ~6% of the sweep's 512); keeps every entry (the index is extra).
    **{
      f"range_search{b:g}": functools.partial(
        range_search.range_search_transform, b, buffer=32
      )
      for b in (0.05, 0.1, 0.2)
    },
  }
)
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
# Learned budgets: name -> (capacity) -> transform. SP-KV's hard gate at
# the paper's tau = 0.5 and window 128 (the shipped kvjax-tiny-spkv was
# fine-tuned with that window); `capacity` is the compacted cache's static
# entries per head (the largest head budget, from
# `kvjax.compress.spkv.kept_counts`; None: the live bound, no physical
# saving).
SPKV_TAU, SPKV_WINDOW = 0.5, 128
LEARNED: Mapping[str, Callable[..., base.KVTransform]] = types.MappingProxyType(
  {"spkv": lambda capacity=None: spkv_gate(SPKV_TAU, SPKV_WINDOW, capacity)}
)
LEARNED_NAMES: tuple[str, ...] = tuple(LEARNED)
# The methods NVIDIA kvpress 0.5.5 also ships beyond the ones above, under
# the names its users know (`tests/compress/test_methods.py` runs each end
# to end).
KVPRESS_NAMES: tuple[str, ...] = (
  *scorers.METHODS,
  *structure.METHODS,
  *model_aware.METHODS,
  *rewrite.METHODS,
)
CODEC_NAMES: tuple[str, ...] = tuple(CODECS)


def _allowed() -> str:
  return (
    f"a policy {sorted(POLICY_NAMES)}, a learned method "
    f"{sorted(LEARNED_NAMES)}, a codec {sorted(CODEC_NAMES)}, "
    f"or 'policy{SEPARATOR}codec'"
  )


def parse(method: str) -> tuple[str | None, str | None]:
  """The (policy, codec) names of `method`, None where it has none.

  Raises:
    ValueError: `method` is not a policy, a codec or 'policy+codec' of
      registered names (the message lists the allowed names).
  """
  if not isinstance(method, str):
    raise ValueError(
      f"method must be a string, got {method!r}; allowed: {_allowed()}."
    )
  if SEPARATOR in method:
    policy, codec = method.split(SEPARATOR, 1)
    if (policy not in POLICIES and policy not in LEARNED) or (
      codec not in CODECS
    ):
      raise ValueError(
        f"method {method!r}: compose a policy "
        f"{sorted(POLICY_NAMES + LEARNED_NAMES)} with a codec "
        f"{sorted(CODEC_NAMES)} as "
        f"'policy{SEPARATOR}codec'."
      )
    return policy, codec
  if method in POLICIES or method in LEARNED:
    return method, None
  if method in CODECS:
    return None, method
  raise ValueError(f"unknown method {method!r}; allowed: {_allowed()}.")


def write_gate(method: str) -> model_lib.WriteGate:
  """The hard gate a learned method's model runs its prefill with
  (`kvjax.prefill(..., write_gate=)`), so that prefill, compression and
  what follows compute one gated pass (see `kvjax.compress.spkv`).

  Raises:
    ValueError: `method` is not a learned method.
  """
  policy, _ = parse(method)
  if policy not in LEARNED:
    raise ValueError(
      f"method {method!r} is not learned; learned: {sorted(LEARNED_NAMES)}."
    )
  return model_lib.WriteGate("hard", SPKV_WINDOW, SPKV_TAU)


def takes_ratio(method: str) -> bool:
  """Whether `method` evicts at a given ratio (a policy, alone or before a
  codec); False for a codec alone and for a learned method.

  Raises:
    ValueError: an unknown method.
  """
  return parse(method)[0] in POLICIES


def is_learned(method: str) -> bool:
  """Whether `method`'s eviction is a learned gate (`LEARNED_NAMES`): it
  needs a model with write gates.

  Raises:
    ValueError: an unknown method.
  """
  return parse(method)[0] in LEARNED


def build(
  method: str, ratio: float | None = None, *, capacity: int | None = None
) -> base.KVTransform:
  """The transform `method` names, its policy at eviction `ratio`.

  Transforms compare by value: building the same method and ratio twice
  gives equal transforms, so a jitted entry compiles once for both.

  Args:
    method: a name of `POLICY_NAMES` or `CODEC_NAMES`, or 'policy+codec'.
    ratio: the share of entries a policy removes, in [0, 1); a codec alone
      and a learned method take none (None or 0).
    capacity: a learned method's static entries per head (see `LEARNED`);
      the others take none.

  Returns:
    The transform; its `.name` is `method`.

  Raises:
    ValueError: an unknown method (naming the allowed ones), a policy
      without a ratio, a ratio > 0 for a codec alone or a learned method,
      or a capacity for a method that is not learned.
  """
  policy, codec = parse(method)
  if capacity is not None and policy not in LEARNED:
    raise ValueError(
      f"method {method!r}: capacity is a learned method's "
      f"({sorted(LEARNED_NAMES)}); got capacity={capacity!r}."
    )
  if policy in LEARNED:
    if ratio:
      raise ValueError(
        f"method {method!r} is learned: the model's gates set its budget, "
        f"it takes no ratio, got {ratio!r}."
      )
    gate = LEARNED[policy](capacity)
    return gate if codec is None else base.chain(gate, CODECS[codec]())
  if policy is None:
    if ratio:
      raise ValueError(
        f"method {method!r} is a codec: it takes no ratio, got {ratio!r}."
      )
    return CODECS[codec]()
  if ratio is None:
    raise ValueError(f"method {method!r} evicts: give its ratio.")
  evict = POLICIES[policy](ratio)
  return evict if codec is None else base.chain(evict, CODECS[codec]())
