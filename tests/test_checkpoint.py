"""kvjax.checkpoint: exact orbax round trip and clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import checkpoint


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
  config = kvjax.get_config("tiny", qkv_bias=True, qk_norm=True, dtype=dtype,
                            rope_scaling=kvjax.RopeScaling("linear", 2.0))
  params = kvjax.init_params(config, jax.random.key(3))
  checkpoint.save(str(tmp_path / "ck"), params, config)
  got_config, got = checkpoint.restore(str(tmp_path / "ck"))
  assert got_config == config
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32),
                                  np.asarray(b, np.float32))
  tokens = jnp.ones((1, 4), jnp.int32)
  l1, _, _ = kvjax.forward(params, tokens, kvjax.init_cache(config, 1, 4),
                           config=config)
  l2, _, _ = kvjax.forward(got, tokens, kvjax.init_cache(config, 1, 4),
                           config=got_config)
  np.testing.assert_array_equal(l1, l2)


def test_errors(tmp_path):
  config = kvjax.get_config("tiny")
  params = kvjax.init_params(config, jax.random.key(0))
  with pytest.raises(ValueError, match="params do not match config"):
    checkpoint.save(str(tmp_path / "a"), params, config.replace(d_model=64))
  checkpoint.save(str(tmp_path / "b"), params, config)
  with pytest.raises(ValueError, match="already exists"):
    checkpoint.save(str(tmp_path / "b"), params, config)
  with pytest.raises(ValueError, match="not a kvjax checkpoint"):
    checkpoint.restore(str(tmp_path))
