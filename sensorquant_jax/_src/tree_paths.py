"""'/'-joined leaf paths: from JAX key paths, and back to nested dicts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def join(*parts: Any) -> str:
  """``"a/b/c"`` from path components (Flax module paths, NNX node paths, leaf names)."""
  return "/".join(str(p) for p in parts)


def path_str(path: Sequence[Any]) -> str:
  """Joins a JAX key path into ``"params/Dense_0/kernel"``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def check_paths(paths: Sequence[str]) -> None:
  """Raises ValueError if the paths cannot form one nested dict.

  Two leaves clash when they are equal or one is a prefix folder of the
  other (``a`` and ``a/b``): nesting would drop one of them.
  """
  seen: set[str] = set()
  for p in paths:
    if p in seen:
      raise ValueError(f"leaf {p!r} appears twice")
    seen.add(p)
  if len(seen) > 1 and "" in seen:
    raise ValueError("a root leaf '' cannot sit beside other leaves")
  for p in paths:
    parts = p.split("/")
    for k in range(1, len(parts)):
      prefix = "/".join(parts[:k])
      if prefix in seen:
        raise ValueError(f"leaves {prefix!r} and {p!r} clash (one is inside the other)")


def nest(paths: Sequence[str], values: Sequence[Any]) -> Any:
  """Builds nested dicts from '/'-paths (a lone ``""`` path is the root itself).

  Raises:
    ValueError: clashing paths (see :func:`check_paths`).
  """
  check_paths(paths)
  if list(paths) == [""]:
    return values[0]
  root: dict = {}
  for p, v in zip(paths, values, strict=True):
    parts = p.split("/")
    d = root
    for k in parts[:-1]:
      d = d.setdefault(k, {})
    d[parts[-1]] = v
  return root


def get(tree: Any, path: str) -> Any:
  """The leaf of nested dicts at '/'-path ``path``."""
  if path == "":
    return tree
  for k in path.split("/"):
    tree = tree[k]
  return tree
