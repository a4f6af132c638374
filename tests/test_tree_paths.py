"""'/'-joined leaf paths: joining, nesting, clashes."""

import jax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sensorquant_jax._src import tree_paths

names = st.text(alphabet="abcxyz_0", min_size=1, max_size=3)


@given(st.dictionaries(names, st.dictionaries(names, st.integers(), min_size=1), min_size=1))
def test_nest_inverts_flattening(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  paths = [tree_paths.path_str(p) for p, _ in leaves]
  assert tree_paths.nest(paths, [v for _, v in leaves]) == tree
  for p, (_, v) in zip(paths, leaves, strict=True):
    assert tree_paths.get(tree, p) == v


@pytest.mark.parametrize(
  "paths, needle",
  [
    (["a", "a"], "twice"),
    (["a", "a/b"], "clash"),
    (["x/a/b", "x/a"], "clash"),
    (["", "a"], "root"),
  ],
)
def test_clashing_paths_are_refused(paths, needle):
  with pytest.raises(ValueError, match=needle):
    tree_paths.nest(paths, list(range(len(paths))))


def test_join_and_root():
  assert tree_paths.join("params", "blocks_0", 3, "kernel") == "params/blocks_0/3/kernel"
  assert tree_paths.nest([""], [7]) == 7
