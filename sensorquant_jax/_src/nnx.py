"""Quantizing Flax NNX models in place of their Linear, LinearGeneral, Einsum and Embed layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sensorquant_jax._src import flax_common, options, schemes
from sensorquant_jax._src.options import Mode, Scheme
from sensorquant_jax._src.qarray import QArray
from sensorquant_jax._src.quantize import MIN_SIZE, RulesLike
from sensorquant_jax._src.quantize import quantize as _quantize_tree
from sensorquant_jax._src.tree_paths import join, path_str
from sensorquant_jax._src.tree_paths import nest as _nest


class QuantizedLinear(nnx.Module):
  """``nnx.Linear``/``nnx.LinearGeneral`` with an int8 :class:`QArray` kernel."""

  def __init__(self, kernel: QArray, bias, *, axis=(-1,), mode: Mode = "weight_only", dtype=None):
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.axis = tuple(axis)
    self.mode = mode
    self.dtype = dtype

  def __call__(self, x, out_sharding=None):
    kernel = self.kernel.get_value()
    bias = None if self.bias is None else self.bias.get_value()
    y = flax_common.dense_general_axes(x, kernel, bias, self.axis, mode=self.mode, dtype=self.dtype)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


class QuantizedEmbed(nnx.Module):
  """``nnx.Embed`` with an int8 table: lookups gather int8 rows, ``attend`` uses the int8 op."""

  def __init__(self, embedding: QArray, *, mode: Mode = "weight_only", dtype=None):
    self.embedding = nnx.Param(embedding)
    self.mode = mode
    self.dtype = dtype

  def __call__(self, inputs):
    return flax_common.embed_lookup(self.embedding.get_value(), inputs, self.dtype)

  def attend(self, query):
    return flax_common.embed_attend(
      self.embedding.get_value(), query, mode=self.mode, dtype=self.dtype
    )


class QuantizedEinsum(nnx.Module):
  """``nnx.Einsum`` with an int8 kernel, dequantized per call (arbitrary equations)."""

  def __init__(self, einsum_str: str, kernel: QArray, bias, *, dtype=None):
    self.einsum_str = einsum_str
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.dtype = dtype

  def __call__(self, x, out_sharding=None):
    kernel = self.kernel.get_value()
    dt = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
    y = jnp.einsum(self.einsum_str, x.astype(dt), kernel.dequantize(dt))
    if self.bias is not None:
      y = y + self.bias.get_value().astype(dt)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


def _get(parent, key):
  return (
    parent[key] if isinstance(key, int) or not hasattr(parent, str(key)) else getattr(parent, key)
  )


def _set(parent, key, value):
  if isinstance(key, int) or isinstance(parent, (list, dict)):
    parent[key] = value
  else:
    setattr(parent, key, value)


def quantize(
  model: nnx.Module,
  scheme: Scheme = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  mode: Mode = "weight_only",
  check_finite: bool = True,
) -> nnx.Module:
  """Returns a copy of ``model`` whose big Linear/LinearGeneral/Einsum/Embed layers are int8.

  Leaves are chosen exactly as :func:`sensorquant_jax.quantize` chooses them,
  on paths such as ``"blocks/0/attn/query/kernel"``; chosen layers are replaced
  by :class:`QuantizedLinear`, :class:`QuantizedEmbed` or
  :class:`QuantizedEinsum`, which call the int8 ops (``mode`` selects
  weight-only or W8A8). The input model is left unchanged.

  Example:
    >>> qmodel = sq.nnx.quantize(model, "symmetric_per_channel_int8")
    >>> y = nnx.jit(lambda m, x: m(x))(qmodel, x)
  """
  options.check("mode", mode, options.MODES)
  model = nnx.clone(model)
  targets = []
  for path, node in nnx.iter_graph(model):
    if not path:
      continue
    kind = type(node)
    if kind is nnx.Linear or kind is nnx.LinearGeneral:
      if kind is nnx.LinearGeneral and node.batch_axis:
        continue
      targets.append((path, node, "kernel"))
    elif kind is nnx.Einsum:
      targets.append((path, node, "kernel"))
    elif kind is nnx.Embed:
      targets.append((path, node, "embedding"))
  tree = {join(*path, leaf): getattr(node, leaf).get_value() for path, node, leaf in targets}
  # Flatten to one level so that rules see the full path, as in `quantize`.
  nested = _nest(list(tree), list(tree.values()))
  qtree = _quantize_tree(nested, scheme, rules, min_size=min_size, check_finite=check_finite)
  flat = dict(
    (path_str(p), x)
    for p, x in jax.tree_util.tree_flatten_with_path(
      qtree, is_leaf=lambda x: isinstance(x, QArray)
    )[0]
  )
  for path, node, leaf in targets:
    q = flat[join(*path, leaf)]
    if not isinstance(q, QArray):
      continue
    kind = type(node)
    bias = getattr(node, "bias", None)
    bias = None if bias is None else bias.get_value()
    if kind is nnx.Embed:
      new: nnx.Module = QuantizedEmbed(q, mode=mode, dtype=node.dtype)
    elif kind is nnx.Einsum:
      new = QuantizedEinsum(node.einsum_str, q, bias, dtype=node.dtype)
    else:
      axis = node.axis if kind is nnx.LinearGeneral else -1
      axis = axis if isinstance(axis, tuple) else (axis,)
      new = QuantizedLinear(q, bias, axis=axis, mode=mode, dtype=node.dtype)
    parent = model
    for key in path[:-1]:
      parent = _get(parent, key)
    _set(parent, path[-1], new)
  return model
