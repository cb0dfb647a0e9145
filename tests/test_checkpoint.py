"""kvjax.checkpoint: exact orbax round trip and clear errors."""

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import checkpoint


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
  config = kvjax.get_config(
    "tiny",
    qkv_bias=True,
    qk_norm=True,
    dtype=dtype,
    rope_scaling=kvjax.RopeScaling("linear", 2.0),
  )
  params = kvjax.init_params(config, jax.random.key(3))
  checkpoint.save(str(tmp_path / "ck"), params, config)
  got_config, got = checkpoint.restore(str(tmp_path / "ck"))
  assert got_config == config
  assert jax.tree.structure(got) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(
      np.asarray(a, np.float32), np.asarray(b, np.float32)
    )
  tokens = jnp.ones((1, 4), jnp.int32)
  l1, _, _ = kvjax.forward(
    params, tokens, kvjax.init_cache(config, 1, 4), config=config
  )
  l2, _, _ = kvjax.forward(
    got, tokens, kvjax.init_cache(config, 1, 4), config=got_config
  )
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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(config, params, path) of one checkpoint; tests corrupt copies of it."""
  config = kvjax.get_config("tiny", num_layers=1)
  params = kvjax.init_params(config, jax.random.key(1))
  path = str(tmp_path_factory.mktemp("saved") / "ck")
  checkpoint.save(path, params, config)
  return config, params, path


def _copy(saved, tmp_path):
  path = str(tmp_path / "copy")
  shutil.copytree(saved[2], path)
  return path


def _largest_file(path):
  files = [
    os.path.join(d, f)
    for d, _, fs in os.walk(os.path.join(path, "params"))
    for f in fs
  ]
  return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["remove", "truncate", "flip"])
def test_damaged_checkpoint_raises_one_clear_error(
  saved, tmp_path, capfd, damage
):
  path = _copy(saved, tmp_path)
  victim = _largest_file(path)
  rel = os.path.relpath(victim, path)
  size = os.path.getsize(victim)
  if damage == "remove":
    os.remove(victim)
    match = rf"{re.escape(rel)} is missing"
  elif damage == "truncate":
    with open(victim, "r+b") as f:
      f.truncate(size // 2)
    match = rf"{re.escape(rel)} has {size // 2} bytes, expected {size}"
  else:  # Same size, one byte changed: orbax alone restores it silently.
    with open(victim, "r+b") as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
    match = rf"{re.escape(rel)} has the right size but different content"
  with pytest.raises(
    ValueError,
    match=rf"checkpoint '{re.escape(path)}' is "
    rf"corrupt or incomplete: {match}",
  ) as info:
    checkpoint.restore(path)
  assert info.value.__context__ is None  # Found before orbax read anything.
  assert "Event loop is closed" not in capfd.readouterr().err


def test_restore_checks_the_given_config(saved):
  config, params, path = saved
  got_config, got = checkpoint.restore(path, config.replace(name="other"))
  assert got_config == config
  np.testing.assert_array_equal(got["embed"], params["embed"])
  with pytest.raises(
    ValueError,
    match=r"saved with a different config; "
    r"differing fields: rope_theta: saved 10000.0, given "
    r"500000.0; norm_eps: saved 1e-06, given 1e-05\.",
  ):
    checkpoint.restore(path, config.replace(rope_theta=5e5, norm_eps=1e-5))
  with pytest.raises(
    ValueError,
    match=r"rope_scaling: saved None, given "
    r"RopeScaling\(rope_type='linear'",
  ):
    checkpoint.restore(
      path, config.replace(rope_scaling=kvjax.RopeScaling("linear", 2.0))
    )
  with pytest.raises(TypeError, match="config must be a ModelConfig"):
    checkpoint.restore(path, config.to_dict())


@pytest.mark.parametrize(
  "change,match",
  [
    (
      dict(d_model=64),
      r"embed is float32\[512, 128\], config.json implies "
      r"float32\[512, 64\]",
    ),
    (dict(qkv_bias=True), r"layers/bk is missing; layers/bq is missing"),
    (dict(tie_embeddings=True), r"lm_head is not expected"),
    (
      dict(dtype="bfloat16"),
      r"final_norm is float32\[128\], config.json "
      r"implies bfloat16\[128\]",
    ),
  ],
)
def test_config_json_not_matching_params_raises(
  saved, tmp_path, capfd, update_json, change, match
):
  path = _copy(saved, tmp_path)
  update_json(os.path.join(path, "config.json"), change)
  with pytest.raises(
    ValueError,
    match=r"params/ does not match its "
    rf"config.json: .*{match}",
  ):
    checkpoint.restore(path)
  assert "Event loop is closed" not in capfd.readouterr().err


def test_unreadable_config_json_raises(saved, tmp_path):
  path = _copy(saved, tmp_path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write('{"vocab_size": 512,')
  with pytest.raises(
    ValueError,
    match=r"config.json is not a valid "
    r"ModelConfig \(JSONDecodeError",
  ):
    checkpoint.restore(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"vocab_size": 512, "colour": "red"}, f)
  with pytest.raises(ValueError, match=r"not a valid ModelConfig.*colour"):
    checkpoint.restore(path)


def test_unreadable_files_json_raises(saved, tmp_path):
  path = _copy(saved, tmp_path)
  manifest = os.path.join(path, "files.json")
  with open(manifest) as f:
    good = json.load(f)
  with open(manifest, "w") as f:
    f.write("{")
  with pytest.raises(
    ValueError,
    match=r"files.json is unreadable "
    r"\(JSONDecodeError",
  ):
    checkpoint.restore(path)
  with open(manifest, "w") as f:
    json.dump({**good, "format": 2}, f)
  with pytest.raises(
    ValueError,
    match=r"files.json has format 2; this kvjax "
    r"reads format 1",
  ):
    checkpoint.restore(path)


# Without files.json the damage is found by orbax itself, whose abandoned
# reads then warn from the garbage collector (nothing kvjax can catch).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_checkpoint_without_files_json_still_restores(saved, tmp_path):
  # Checkpoints written before files.json existed restore as before; a
  # damaged one still gives one ValueError (from orbax's failure).
  config, params, path = saved
  path = _copy(saved, tmp_path)
  os.remove(os.path.join(path, "files.json"))
  got_config, got = checkpoint.restore(path)
  assert got_config == config
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  metadata = os.path.join(path, "params", "_METADATA")
  shutil.copy(metadata, str(tmp_path / "_METADATA"))
  os.remove(metadata)
  with pytest.raises(
    ValueError,
    match=r"corrupt or incomplete: params/ has "
    r"no orbax tree metadata",
  ):
    checkpoint.restore(path)
  shutil.copy(str(tmp_path / "_METADATA"), metadata)
  victim = _largest_file(path)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  match = (
    rf"checkpoint '{re.escape(path)}' is corrupt or incomplete: orbax "
    r"cannot read params/"
  )
  with pytest.raises(ValueError, match=match) as info:
    checkpoint.restore(path)
  assert info.value.__suppress_context__  # One error, not orbax's chain.
