"""Streaming quantization: float checkpoint on disk -> quantized checkpoint on disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import checkpoint, schemes, tree_paths
from sensorquant_jax._src.options import Scheme
from sensorquant_jax._src.qarray import is_qarray
from sensorquant_jax._src.quantize import MIN_SIZE, RulesLike, quantize


def quantize_file(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  metadata: dict | None = None,
  progress: Callable[[str, int], None] | None = None,
  part_bytes: int = 256 << 20,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Quantizes a float checkpoint leaf by leaf and saves the result to ``dst``.

  Only one float leaf is in memory at a time (``.npz`` and ``.safetensors``
  are read lazily) and quantized leaves are written out in parts of about
  ``part_bytes``, so peak memory is about the largest float leaf plus one
  part, not the model.
  Selection, rules and errors are those of :func:`sensorquant_jax.quantize`.

  Args:
    src: float checkpoint (``.npz``, ``.safetensors``, ``.msgpack``, Orbax folder).
    dst: destination folder (a :func:`sensorquant_jax.save` checkpoint).
    scheme: default scheme.
    rules: per-leaf rules, as for ``quantize``.
    min_size: as for ``quantize``.
    metadata: stored with the checkpoint.
    progress: called with ``(leaf path, float bytes)`` after each leaf.
    part_bytes: quantized bytes buffered before a part is written.
    overwrite: allow replacing an existing sensorquant checkpoint at ``dst``
      (see :class:`~sensorquant_jax.checkpoint.CheckpointWriter`).

  Returns:
    A summary: leaves, quantized leaves, float bytes, stored bytes.

  Raises:
    DestinationError: ``dst`` is not a place we may write (checked first).
    CheckpointError: ``src`` is unreadable or corrupt.
  """
  n, nq, float_bytes, stored = 0, 0, 0, 0
  with checkpoint.CheckpointWriter(
    dst, metadata, part_bytes=part_bytes, overwrite=overwrite
  ) as writer:
    for path, x in checkpoint.iter_float_leaves(src):
      floating = np.issubdtype(x.dtype, np.floating)
      single = tree_paths.nest([path], [jnp.asarray(x) if floating else x])
      leaf = tree_paths.get(quantize(single, scheme, rules, min_size=min_size), path)
      if is_qarray(leaf):
        nq += 1
        leaf = jax.block_until_ready(leaf)
        stored += leaf.nbytes
      else:
        leaf = np.asarray(x)
        stored += leaf.nbytes
      writer.add(path, leaf)
      n += 1
      float_bytes += x.nbytes
      del x, single, leaf
      if progress is not None:
        progress(path, float_bytes)
  return {"leaves": n, "quantized": nq, "float_bytes": float_bytes, "stored_bytes": stored}
