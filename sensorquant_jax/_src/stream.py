"""Streaming quantization: float checkpoint on disk -> quantized checkpoint on disk."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from sensorquant_jax._src import checkpoint, distributed, schemes, tree_paths
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

  Across processes (``jax.distributed`` joined, every process calling this
  with the same arguments) each leaf is split between the processes along
  its first axis their count divides; each process reads, quantizes and
  writes only its part (from ``.safetensors``, only its bytes are read), so
  each holds about ``1 / processes`` of the above. Per-tensor and
  per-channel scales are reduced across the processes: the checkpoint is the
  one a single process writes.
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
  shared = distributed.is_multiprocess()
  with checkpoint.CheckpointWriter(
    dst, metadata, part_bytes=part_bytes, overwrite=overwrite
  ) as writer:
    leaves = _shared_leaves(src) if shared else _whole_leaves(src)
    for path, x in leaves:
      floating = np.issubdtype(x.dtype, np.floating)
      single = tree_paths.nest([path], [jnp.asarray(x) if floating else x])
      leaf = tree_paths.get(quantize(single, scheme, rules, min_size=min_size), path)
      if is_qarray(leaf):
        nq += 1
        leaf = jax.block_until_ready(leaf)
        stored += leaf.nbytes
      else:
        leaf = x if shared else np.asarray(x)
        stored += leaf.nbytes
      writer.add(path, leaf)
      n += 1
      float_bytes += x.nbytes
      del x, single, leaf
      if progress is not None:
        progress(path, float_bytes)
  return {"leaves": n, "quantized": nq, "float_bytes": float_bytes, "stored_bytes": stored}


def _whole_leaves(src: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
  """The leaves of ``src``, one at a time (from ``.safetensors``, read without a memory map)."""
  for path, shape, _, read in checkpoint.iter_float_regions(src):
    yield path, np.asarray(read((slice(None),) * len(shape)))


def _shared_leaves(src: str | os.PathLike) -> Iterator[tuple[str, jax.Array]]:
  """The leaves of ``src`` as global arrays split between the processes.

  Each leaf is split along its first axis that the process count divides
  (else every process holds it whole) and each process reads only its part:
  from a ``.safetensors`` file, only those bytes.
  """
  mesh = distributed.processes_mesh(1)
  n = jax.process_count()
  for path, shape, _, read in checkpoint.iter_float_regions(src):
    axis = next((a for a, d in enumerate(shape) if d >= n and d % n == 0), None)
    spec = [("processes" if a == axis else None) for a in range(len(shape))]
    sharding = NamedSharding(mesh, PartitionSpec(*spec))

    def region(index: tuple[slice, ...] | None, read=read) -> np.ndarray:
      return read(() if index is None else index)

    yield path, jax.make_array_from_callback(shape, sharding, region)
