"""KV-cache compression transforms: eviction policies and codecs.

Every factory returns a `KVTransform` (optax-style NamedTuple of pure
functions); `chain` composes them, e.g. `chain(snapkv(ratio=0.75),
kivi(bits=2))` evicts then quantizes.
"""

from kvjax.compress.base import (
  CompressContext,
  Degenerate,
  KVTransform,
  by_value,
  chain,
  compact,
  identity,
  keep_top,
)
from kvjax.compress.policies import (
  SCORERS,
  BudgetState,
  H2OState,
  Scorer,
  adakv,
  attention_mass_scorer,
  expected_attention,
  expected_attention_scorer,
  h2o,
  knorm,
  knorm_scorer,
  oracle,
  oracle_future_mass,
  oracle_scorer,
  pyramid_budgets,
  pyramidkv,
  random,
  random_scorer,
  scored_policy,
  resolve_scorer,
  scorer_by_name,
  snapkv,
  snapkv_scorer,
  streaming_llm,
  streaming_llm_scorer,
  tova,
  tova_scorer,
  window_attention,
)
from kvjax.compress.codecs import (
  KIVIState,
  fp8,
  fp8_codec,
  int_codec,
  kivi,
  lowrank,
  quantize,
  windowed_quantize,
  uniform,
)
from kvjax.compress.rotated import (
  lloyd_max_codebook,
  polarquant,
  qjl,
  qjl_codec,
  turboquant,
  turboquant_codec,
)
from kvjax.compress.scorers import (
  compactor,
  compactor_scorer,
  cur,
  cur_scorer,
  keydiff,
  keydiff_scorer,
  lagkv,
  lagkv_scorer,
  leverage_score,
  leverage_score_scorer,
  non_causal_attn,
  non_causal_attn_scorer,
  observed_attention,
  observed_attention_scorer,
  qfilter,
  qfilter_filters,
  qfilter_scorer,
)
from kvjax.compress.structure import (
  block,
  chunk,
  chunkkv,
  duo_attention,
  duo_head_scores,
  per_layer,
  simlayerkv,
)
from kvjax.compress.model_aware import (
  DecodingState,
  critical_adakv,
  criticalkv,
  decoding,
  finch,
  kvzip,
  kvzip_scores,
  output_value_norm,
)
from kvjax.compress.rewrite import (
  CAMState,
  cam,
  cam_merge,
  key_rerotation,
  merge_values,
  merging,
  rerotate,
  rotate_keys,
  think,
  think_channels,
  think_codec,
)
from kvjax.compress.spkv import SPKVState, kept_counts, spkv  # noqa: F401
from kvjax.compress.range_search import (  # noqa: F401
  range_codec,
  range_search_transform,
)
from kvjax.compress import registry  # one name per method
