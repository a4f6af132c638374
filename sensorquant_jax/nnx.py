"""Quantizing Flax NNX models in place of their Linear, LinearGeneral, Einsum and Embed layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sensorquant_jax import ops, schemes
from sensorquant_jax.linen import _take_rows, transpose_2d
from sensorquant_jax.qarray import QArray
from sensorquant_jax.quantize import MIN_SIZE, RulesLike
from sensorquant_jax.quantize import quantize as _quantize_tree
from sensorquant_jax.tree_paths import nest as _nest


class QuantizedLinear(nnx.Module):
  """``nnx.Linear``/``nnx.LinearGeneral`` with an int8 :class:`QArray` kernel."""

  def __init__(self, kernel: QArray, bias, *, axis=(-1,), mode="weight_only", dtype=None):
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.axis = tuple(axis)
    self.mode = mode
    self.dtype = dtype

  def __call__(self, x, out_sharding=None):
    axis = tuple(a % x.ndim for a in self.axis)
    rest = tuple(a for a in range(x.ndim) if a not in axis)
    if axis != tuple(range(x.ndim - len(axis), x.ndim)):
      x = jnp.transpose(x, rest + axis)
    kernel = self.kernel.get_value()
    bias = None if self.bias is None else self.bias.get_value()
    dt = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
    y = ops.dense_general(x.astype(dt), kernel, bias, n_in=len(axis), mode=self.mode, dtype=dt)
    return y if out_sharding is None else jax.lax.with_sharding_constraint(y, out_sharding)


class QuantizedEmbed(nnx.Module):
  """``nnx.Embed`` with an int8 table: lookups gather int8 rows, ``attend`` uses the int8 op."""

  def __init__(self, embedding: QArray, *, mode="weight_only", dtype=None):
    self.embedding = nnx.Param(embedding)
    self.mode = mode
    self.dtype = dtype

  def __call__(self, inputs):
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError("Input type must be an integer or unsigned integer.")
    out = _take_rows(self.embedding.get_value(), inputs)
    return out.astype(self.dtype or out.dtype)

  def attend(self, query):
    table = self.embedding.get_value()
    dt = self.dtype or jnp.result_type(query.dtype, table.dtype)
    return ops.dense(query.astype(dt), transpose_2d(table), mode=self.mode, dtype=dt)


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
  scheme: str = schemes.PER_TENSOR,
  rules: RulesLike = None,
  *,
  min_size: int = MIN_SIZE,
  mode: str = "weight_only",
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
  if mode not in ops.MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {ops.MODES}")
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
  tree = {
    "/".join(map(str, path)) + "/" + leaf: getattr(node, leaf).get_value()
    for path, node, leaf in targets
  }
  # Flatten to one level so that rules see the full path, as in `quantize`.
  nested = _nest(list(tree), list(tree.values()))
  qtree = _quantize_tree(nested, scheme, rules, min_size=min_size, check_finite=check_finite)
  flat = dict(
    ("/".join(str(getattr(k, "key", k)) for k in p), x)
    for p, x in jax.tree_util.tree_flatten_with_path(
      qtree, is_leaf=lambda x: isinstance(x, QArray)
    )[0]
  )
  for path, node, leaf in targets:
    q = flat["/".join(map(str, path)) + "/" + leaf]
    if not isinstance(q, QArray):
      continue
    kind = type(node)
    bias = getattr(node, "bias", None)
    bias = None if bias is None else bias.get_value()
    if kind is nnx.Embed:
      new = QuantizedEmbed(q, mode=mode, dtype=node.dtype)
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
