"""Conversion between quantized pytrees and the Rust manifest (:mod:`.manifest`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import schemes
from sensorquant_jax._src.manifest import SCHEME, ManifestError, QuantizedModel, QuantizedWeights
from sensorquant_jax._src.qarray import QArray, is_qarray
from sensorquant_jax._src.tree_paths import path_str

NameFn = Callable[[str], str]


class RequantizationWarning(UserWarning):
  """Emitted by ``to_manifest(..., requantize=True)`` with the error it added."""


def default_layer_name(path: str) -> str:
  """``"params/encoder/blocks_0/attn/q_proj/kernel"`` -> ``"encoder.blocks_0.attn.q_proj"``.

  The Flax collection (a leading ``params``) and the leaf name are dropped and
  the module path is joined with ``.``.
  """
  parts = path.split("/")
  if len(parts) > 1 and parts[0] == "params":
    parts = parts[1:]
  return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def _out_ndim(leaf: str, shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> int:
  """How many trailing kernel axes are output features.

  The flattening rule: a kernel's output axes are its trailing axes matching
  the sibling ``bias`` shape (DenseGeneral q/k/v ``[in, heads, head_dim]`` with
  bias ``[heads, head_dim]`` -> 2; the output projection ``[heads, head_dim,
  out]`` with bias ``[out]`` -> 1); without a bias, the last axis. The manifest
  stores ``[prod(out axes), prod(in axes)]`` row-major: Dense ``[in, out]``
  becomes ``kernel.T``. Embedding tables (leaf ``embedding``) are stored as
  they are, ``[vocab, features]``, the layout of a tied output projection.
  """
  if leaf == "embedding":
    return 0
  if len(shape) < 2:
    return len(shape)
  if bias_shape is not None and 0 < len(bias_shape) < len(shape):
    if tuple(shape[-len(bias_shape) :]) == tuple(bias_shape):
      return len(bias_shape)
  return 1


def _to_2d(x: np.ndarray, n_out: int) -> np.ndarray:
  if n_out == 0 or x.ndim < 2:
    return x.reshape(x.shape[0] if x.ndim else 1, -1) if x.ndim >= 2 else x
  k = x.ndim - n_out
  rows = math.prod(x.shape[k:])
  return np.moveaxis(x.reshape(math.prod(x.shape[:k]), rows), 0, 1)


def _from_2d(flat: np.ndarray, shape: tuple[int, ...], n_out: int) -> np.ndarray:
  if n_out == 0 or len(shape) < 2:
    return flat.reshape(shape)
  k = len(shape) - n_out
  cols = math.prod(shape[:k])
  rows = math.prod(shape[k:])
  return np.ascontiguousarray(flat.reshape(rows, cols).T).reshape(shape)


def _manifest_shape(shape: tuple[int, ...], n_out: int) -> tuple[int, ...]:
  if n_out == 0 or len(shape) < 2:
    return tuple(shape)
  k = len(shape) - n_out
  return (math.prod(shape[k:]), math.prod(shape[:k]))


def _flat(tree: Any) -> list[tuple[str, Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]
  return [(path_str(p), x) for p, x in leaves]


def _siblings(paths: dict[str, Any], path: str, name: str) -> str | None:
  head = path.rsplit("/", 1)[0] if "/" in path else ""
  candidate = f"{head}/{name}" if head else name
  return candidate if candidate in paths else None


def to_manifest(
  qparams: Any,
  config_json: str = "{}",
  *,
  name_fn: NameFn | None = None,
  requantize: bool = False,
) -> QuantizedModel:
  """Builds the Rust manifest for every :class:`QArray` in ``qparams``.

  Args:
    qparams: a tree from :func:`sensorquant_jax.quantize`.
    config_json: the model configuration string stored in the manifest.
    name_fn: maps a leaf's '/'-joined path to its layer name (default
      :func:`default_layer_name`).
    requantize: QArrays of other schemes are dequantized and quantized again
      per-tensor (a :class:`RequantizationWarning` reports the added error);
      by default they raise.

  Returns:
    A :class:`~sensorquant_jax.manifest.QuantizedModel`; each kernel's sibling
    ``bias`` becomes the layer's bias. Layers are in tree order.

  Raises:
    ValueError: a QArray of another scheme without ``requantize``, or two
      leaves with the same layer name.
  """
  name_fn = name_fn or default_layer_name
  flat = _flat(qparams)
  by_path = dict(flat)
  layers: list[QuantizedWeights] = []
  names: dict[str, str] = {}
  added: dict[str, tuple[float, float]] = {}
  for path, x in flat:
    if not is_qarray(x):
      continue
    name = name_fn(path)
    if name in names:
      raise ValueError(f"{path} and {names[name]} both map to layer name {name!r}; pass name_fn")
    names[name] = path
    leaf = path.rsplit("/", 1)[-1]
    bias_path = _siblings(by_path, path, "bias")
    bias = None if bias_path is None else np.asarray(by_path[bias_path], np.float32)
    if x.scheme != SCHEME or x.input_scale is not None:
      if not requantize:
        why = [f"scheme {x.scheme}"] if x.scheme != SCHEME else []
        if x.input_scale is not None:
          why.append("an input scale (AWQ/SmoothQuant)")
        raise ValueError(
          f"{path}: {' and '.join(why)} does not fit the manifest, which holds only plain "
          f"{SCHEME}; "
          "pass requantize=True to requantize it per-tensor"
        )
      w = x.dequantize(jnp.float32)
      y = schemes.quantize_leaf(w, schemes.Spec(schemes.PER_TENSOR))
      err = np.asarray(y.dequantize(jnp.float32)) - np.asarray(w)
      added[name] = (
        float(np.max(np.abs(err), initial=0.0)),
        float(np.linalg.norm(err) / max(np.linalg.norm(np.asarray(w)), 1e-30)),
      )
      x = y
    values = np.asarray(x.values)
    n_out = _out_ndim(leaf, values.shape, None if bias is None else bias.shape)
    q2 = _to_2d(values, n_out)
    layers.append(
      QuantizedWeights(
        name,
        np.ascontiguousarray(q2).reshape(-1),
        _manifest_shape(values.shape, n_out),
        np.float32(np.asarray(x.scale, np.float32).reshape(())),
        None if bias is None else bias.reshape(-1),
      )
    )
  if added:
    lines = "; ".join(f"{k}: max abs {a:.3g}, rel L2 {r:.3g}" for k, (a, r) in added.items())
    warnings.warn(
      f"requantized per-tensor, added error: {lines}", RequantizationWarning, stacklevel=2
    )
  total = sum(layer.size_bytes() for layer in layers)
  return QuantizedModel(config_json, layers, SCHEME, total, 4 * total)


def from_manifest(model: QuantizedModel, like: Any, *, name_fn: NameFn | None = None) -> Any:
  """Rebuilds a quantized pytree shaped like ``like`` from a manifest.

  Args:
    model: a loaded :class:`~sensorquant_jax.manifest.QuantizedModel`.
    like: the float params tree, or an abstract one (``jax.eval_shape``);
      kernels whose layer name is in the manifest become QArrays, their
      sibling ``bias`` takes the manifest's bias, other leaves are kept from
      ``like`` (they must then be concrete).
    name_fn: as in :func:`to_manifest`.

  Returns:
    A tree with the structure of ``like``.

  Raises:
    ManifestError: a layer missing from ``like`` or with a shape that does not
      match, or an abstract ``like`` leaf the manifest does not provide.
  """
  name_fn = name_fn or default_layer_name
  layers = {layer.name: layer for layer in model.layers}
  if len(layers) != len(model.layers):
    raise ManifestError("the manifest repeats a layer name")
  flat = _flat(like)
  by_path = dict(flat)
  filled: dict[str, Any] = {}
  used = set()
  for path, x in flat:
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "bias" or not hasattr(x, "shape") or len(x.shape) == 0:
      continue
    name = name_fn(path)
    if name not in layers:
      continue
    layer = layers[name]
    used.add(name)
    bias_path = _siblings(by_path, path, "bias")
    bias_like = None if bias_path is None else by_path[bias_path]
    shape = tuple(x.shape)
    n_out = _out_ndim(leaf, shape, None if bias_like is None else tuple(bias_like.shape))
    want = _manifest_shape(shape, n_out)
    if tuple(layer.shape) != want:
      raise ManifestError(
        f"layer {name!r}: manifest shape {list(layer.shape)} does not match {path} "
        f"{list(shape)} (expected {list(want)})"
      )
    values = _from_2d(np.asarray(layer.weights_i8, np.int8), shape, n_out)
    scale = np.full((1,) * len(shape), layer.scale, np.float32)
    axes = tuple(range(-len(shape), 0))
    filled[path] = QArray(
      jnp.asarray(values), jnp.asarray(scale), None, SCHEME, axes, None, np.dtype(x.dtype)
    )
    if layer.bias is not None:
      if bias_like is None:
        raise ManifestError(f"layer {name!r} has a bias but {path} has no sibling 'bias'")
      if math.prod(bias_like.shape) != layer.bias.size:
        raise ManifestError(
          f"layer {name!r}: bias has {layer.bias.size} values, {bias_path} needs "
          f"{list(bias_like.shape)}"
        )
      filled[str(bias_path)] = jnp.asarray(layer.bias.reshape(bias_like.shape), bias_like.dtype)
  missing = sorted(set(layers) - used)
  if missing:
    raise ManifestError(f"manifest layers with no matching kernel in `like`: {missing}")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_qarray)
  out, abstract = [], []
  for p, x in leaves:
    path = path_str(p)
    if path in filled:
      out.append(filled[path])
    else:
      if isinstance(x, jax.ShapeDtypeStruct):
        abstract.append(path)
      out.append(x)
  if abstract:
    shown = ", ".join(abstract[:5]) + (", ..." if len(abstract) > 5 else "")
    raise ManifestError(
      f"{len(abstract)} leaves are neither in the manifest nor concrete in `like`: {shown}"
    )
  return jax.tree_util.tree_unflatten(treedef, out)
