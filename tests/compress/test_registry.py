"""kvjax.compress.registry: one name per method, equal to the transform's."""

import inspect
import itertools

import pytest

import kvjax
from kvjax import compress
from kvjax.compress import registry

# by_value factories that assemble a transform from parts (a scorer, codec
# functions, other transforms): no method by themselves.
BUILDING_BLOCKS = {
  "chain",
  "identity",
  "quantize",
  "windowed_quantize",
  "scored_policy",
}


@pytest.mark.parametrize("name", registry.POLICY_NAMES)
def test_policy_builds_a_transform_of_its_name(name):
  transform = registry.build(name, 0.5)
  assert transform.name == name
  assert transform == registry.build(name, 0.5)  # a value: equal anew
  assert registry.parse(name) == (name, None)


@pytest.mark.parametrize("name", registry.CODEC_NAMES)
def test_codec_builds_a_transform_of_its_name(name):
  transform = registry.build(name)
  assert transform.name == name
  assert transform == registry.build(name, 0.0)
  assert registry.parse(name) == (None, name)


def test_names_are_distinct_and_composable():
  names = registry.POLICY_NAMES + registry.CODEC_NAMES + registry.LEARNED_NAMES
  assert len(set(names)) == len(names)
  assert not any(registry.SEPARATOR in n for n in names)


@pytest.mark.parametrize(
  "policy,codec", itertools.product(registry.POLICY_NAMES, registry.CODEC_NAMES)
)
def test_composed_name_is_the_chain_name(policy, codec):
  method = f"{policy}{registry.SEPARATOR}{codec}"
  assert registry.parse(method) == (policy, codec)
  try:
    transform = registry.build(method, 0.5)
  except ValueError as e:  # `chain` refuses a decode-time policy before a
    assert "chain(" in str(e)  # windowed codec, saying why
    return
  assert transform.name == method
  assert transform == compress.chain(
    registry.build(policy, 0.5), registry.build(codec)
  )


def test_unknown_names_raise_listing_the_allowed():
  with pytest.raises(ValueError, match="unknown method 'bogus'") as e:
    registry.build("bogus", 0.5)
  for name in registry.POLICY_NAMES + registry.CODEC_NAMES:
    assert repr(name) in str(e.value)
  for method in ("kivi2+snapkv", "snapkv+", "snapkv+bogus", "+kivi2"):
    with pytest.raises(ValueError, match="policy\\+codec"):
      registry.parse(method)
  with pytest.raises(ValueError, match="give its ratio"):
    registry.build("snapkv")
  with pytest.raises(ValueError, match="takes no ratio"):
    registry.build("kivi2", 0.5)


def test_registry_covers_every_exported_method_factory():
  """Every by_value factory of kvjax.compress that is a method is built by
  some registry name, and the registry builds nothing else."""
  exported = {
    n
    for n in dir(compress)
    if inspect.isfunction(getattr(compress, n))
    and getattr(getattr(compress, n), "by_value", False)
    and not n.endswith("_scorer")
  }
  built = {registry.build(n, 0.5).spec[1] for n in registry.POLICY_NAMES} | {
    registry.build(n).spec[1]
    for n in registry.CODEC_NAMES + registry.LEARNED_NAMES
  }
  assert exported - BUILDING_BLOCKS == built


@pytest.mark.parametrize("name", registry.LEARNED_NAMES)
def test_learned_method_builds_without_a_ratio(name):
  """A learned method (SP-KV): the model's gates set its budget, so it
  takes no ratio; `capacity` sets its static head budget; it composes
  with a codec under the joined name, and names the gate its prefill
  runs under."""
  transform = registry.build(name)
  assert transform.name == name and transform == registry.build(name, 0.0)
  assert registry.build(name, capacity=12) == compress.spkv(0.5, 128, 12)
  assert registry.parse(name) == (name, None)
  assert registry.is_learned(name) and not registry.takes_ratio(name)
  assert registry.takes_ratio("snapkv") and not registry.takes_ratio("kivi2")
  assert registry.write_gate(name) == kvjax.model.WriteGate("hard", 128, 0.5)
  method = f"{name}{registry.SEPARATOR}turboquant3"
  assert registry.parse(method) == (name, "turboquant3")
  assert registry.build(method).name == method
  with pytest.raises(ValueError, match="takes no ratio"):
    registry.build(name, 0.5)
  with pytest.raises(ValueError, match="capacity is a learned method"):
    registry.build("snapkv", 0.5, capacity=12)
  with pytest.raises(ValueError, match="not learned"):
    registry.write_gate("snapkv")
  # A windowed codec cannot follow its decode-time eviction.
  with pytest.raises(ValueError, match="evicts during decode"):
    registry.build(f"{name}{registry.SEPARATOR}kivi2")
