"""Config of the demo job.

bash launch/local.sh                                 # this default
bash launch/local.sh --config.batch_size=8 --config.prompt_len=512
python -m experiments.demo --config.hf_path=/path/to/llama  # a real model
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.preset = "tiny"  # kvjax.config.PRESETS name, used when hf_path is empty.
  c.hf_path = ""  # A Hugging Face checkpoint directory (overrides preset).
  c.dtype = "float32"  # Parameter/activation dtype for the preset model.
  c.seed = 0  # PRNG seed for random weights and prompts.
  c.batch_size = 4  # Rows per batch.
  c.prompt_len = 256  # Padded prompt width T.
  c.min_prompt_len = 64  # Rows get ragged lengths in [min_prompt_len, T].
  c.max_new_tokens = 32  # Tokens generated per row.
  c.temperature = 0.0  # 0 = greedy.
  c.top_k = 0  # 0 = no top-k filter.
  return c
