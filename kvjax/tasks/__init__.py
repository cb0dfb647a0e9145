"""Controlled synthetic tasks for KV-cache experiments, and their scoring.

Pure numpy. `make_batch(task, batch_size, seed=..., context_len=...)` gives a
`TaskBatch` whose context is a prefix that can be prefilled and compressed
before the question; `score` turns predictions into accuracy, abstention and
hallucination rates per task. See `generators` for the token layout and
`suite` for the named entries every kvjax-tiny number refers to.
"""

from kvjax.tasks.generators import (
  DEFAULT_MIXTURE_PARAMS,
  HOPS,
  MQAR_PLACEMENTS,
  TASK_NAMES,
  TASKS,
  ContextTooShortError,
  TaskBatch,
  TaskExample,
  abstention,
  concat_batches,
  default_params,
  make_batch,
  make_example,
  make_mixture_batch,
  min_context_len,
  mqar,
  multihop,
  needle,
  overwrite,
  question_mask,
)
from kvjax.tasks.scoring import TaskScore, predictions_from_logits, score
from kvjax.tasks.suite import SUITE, SUITE_NAMES, SuiteEntry, suite_entry
from kvjax.tasks import text
from kvjax.tasks.vocab import (
  ARROW,
  BOS,
  NUM_SPECIAL,
  PAD,
  QUERY,
  UNKNOWN,
  VOCAB,
  Vocab,
  render,
)
