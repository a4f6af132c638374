"""Timing the dispatcher's candidates ahead of serving: :func:`tune`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from sensorquant_jax._src import ops, options, packed, tuning
from sensorquant_jax._src.options import Mode


def tune(
  qparams_or_model: Any,
  batch_sizes: Sequence[int] = (1,),
  *,
  modes: Sequence[Mode] = ("weight_only",),
  dtype: Any = jnp.float32,
) -> dict[str, str]:
  """Times ``impl="auto"``'s candidates for every quantized kernel now, not while serving.

  Every quantized leaf of rank >= 2 is traced (not run) through
  :func:`sensorquant_jax.dense_general` as a Dense kernel (first axis
  contracted) and, for rank >= 3, as the out-projection of attention (all but
  the last axis contracted), at each batch size: each problem not yet in this
  machine's cache is timed once and cached on disk, so later processes start
  with the choices. With ``SENSORQUANT_TUNING=0`` nothing is timed and the
  result lists the shipped fallbacks.

  Args:
    qparams_or_model: a tree with :class:`QArray` / :class:`PackedQArray`
      leaves (e.g. from :func:`sensorquant_jax.quantize`), or an NNX module
      holding them.
    batch_sizes: activation rows per call to tune for (tokens: batch x
      sequence); rounded up to powers of two as the cache is.
    modes: ``"weight_only"`` and/or ``"w8a8"``.
    dtype: the activations' dtype (e.g. ``jnp.bfloat16`` on GPU).

  Returns:
    ``{problem: implementation}`` for every distinct problem met.

  Example:
    >>> qparams = sq.quantize(params)
    >>> sq.tune(qparams, batch_sizes=(1, 16, 256), dtype=jnp.bfloat16)
  """
  for mode in modes:
    options.check("mode", mode, options.MODES)
  tree = qparams_or_model
  from flax import nnx  # only when tuning a model

  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  leaves = [
    x
    for x in jax.tree_util.tree_leaves(tree, is_leaf=packed.is_quantized)
    if packed.is_quantized(x) and len(x.shape) >= 2
  ]
  with tuning.recording() as choices:
    for w in leaves:
      for n_in in sorted({1, len(w.shape) - 1}):
        for rows in sorted({tuning.rows_bucket(b) for b in batch_sizes}):
          x = jax.ShapeDtypeStruct((rows, *w.shape[:n_in]), dtype)
          for mode in modes:
            jax.eval_shape(
              lambda x, w, n_in=n_in, mode=mode: ops.dense_general(x, w, n_in=n_in, mode=mode),
              x,
              w,
            )
  return dict(choices)
