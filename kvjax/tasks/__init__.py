"""Controlled synthetic tasks for KV-cache experiments, and their scoring.

Pure numpy. `make_batch(task, batch_size, seed=..., context_len=...)` gives a
`TaskBatch` whose context is a prefix that can be prefilled and compressed
before the question; `score` turns predictions into accuracy, abstention and
hallucination rates per task. See `generators` for the token layout.
"""

from kvjax.tasks.generators import (
    DEFAULT_MIXTURE_PARAMS,
    HOPS,
    MQAR_PLACEMENTS,
    TASK_NAMES,
    TASKS,
    TaskBatch,
    TaskExample,
    abstention,
    concat_batches,
    default_params,
    make_batch,
    make_example,
    make_mixture_batch,
    mqar,
    multihop,
    needle,
    overwrite,
    question_mask,
)
from kvjax.tasks.scoring import TaskScore, predictions_from_logits, score
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
