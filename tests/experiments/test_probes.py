"""The probe and pilot scripts are absl mains on public functions only."""

import ast
import os

import pytest

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
PROBES = ("pilot_plateau", "twohop_probe", "walk_links")


def _tree(name):
  with open(os.path.join(ROOT, "experiments", f"{name}.py")) as f:
    return ast.parse(f.read())


@pytest.mark.parametrize("name", PROBES)
def test_probe_is_an_absl_main(name):
  tree = _tree(name)
  guard = [
    node
    for node in tree.body
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
  ]
  assert len(guard) == 1 and "app.run(main)" in ast.unparse(guard[0]), name
  # Nothing runs at import but definitions (flags included).
  for node in tree.body:
    if isinstance(node, ast.Expr):
      assert isinstance(node.value, ast.Constant), (name, ast.unparse(node))


@pytest.mark.parametrize("name", PROBES)
def test_probe_uses_no_private_experiment_names(name):
  tree = _tree(name)
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module.startswith(
      ("experiments", "kvjax")
    ):
      for alias in node.names:
        assert not alias.name.startswith("_"), (name, alias.name)
        modules.add(alias.asname or alias.name)
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Attribute)
      and node.attr.startswith("_")
      and isinstance(node.value, ast.Name)
      and node.value.id in modules
    ):
      pytest.fail(f"{name} reads {node.value.id}.{node.attr}")
