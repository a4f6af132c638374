"""What a Linen model's Dense and DenseGeneral layers read: the layers in call
order, grouped by shared input, and input statistics reduced inside ``jit``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sensorquant_jax._src.batching import as_args
from sensorquant_jax._src.tree_paths import join, path_str


@dataclasses.dataclass(frozen=True)
class Layer:
  """One Dense or DenseGeneral kernel the weight methods (GPTQ, AWQ, SmoothQuant) work on.

  Attributes:
    path: the module's param path (``"params/encoder/fc1"``).
    kernel: its kernel's leaf path (``path + "/kernel"``).
    axis: the input axes it contracts, in kernel order (negative).
    k: contracted size (rows of the ``[K, N]`` view of the kernel).
    group: index of the first layer reading the same input array (q, k and v
      projections share one), so one pass measures them together.
  """

  path: str
  kernel: str
  axis: tuple[int, ...]
  k: int
  group: int


def _weight_layer(module: nn.Module, method: str) -> bool:
  kind = type(module)
  if kind is nn.Dense:
    return method == "__call__"
  return kind is nn.DenseGeneral and method == "__call__" and not module.batch_dims


def act_layer(module: nn.Module, method: str) -> bool:
  """Modules whose input :func:`sensorquant_jax.calibrate` records (Dense,
  DenseGeneral, Embed.attend)."""
  if type(module) is nn.Embed:
    return method == "attend"
  return _weight_layer(module, method)


def input_axes(module: nn.Module) -> tuple[int, ...]:
  """The input axes a Dense or DenseGeneral module contracts, in kernel order."""
  if type(module) is nn.Dense:
    return (-1,)
  axis = module.axis
  return tuple(axis) if isinstance(axis, Sequence) else (axis,)


def rows(x: jax.Array, axis: tuple[int, ...]) -> jax.Array:
  """``x`` as float32 ``[tokens, K]``: the contracted axes last, in kernel order."""
  axes = tuple(a % x.ndim for a in axis)
  rest = tuple(a for a in range(x.ndim) if a not in axes)
  x = jnp.transpose(x, rest + axes)
  k = math.prod(x.shape[x.ndim - len(axes) :])
  return x.reshape(-1, k).astype(jnp.float32)


def layers(model: nn.Module, variables: Any, batch: Any) -> list[Layer]:
  """The model's Dense/DenseGeneral layers in the order they are first called.

  Traced abstractly (``eval_shape``): nothing runs. Layers inside a lifted
  transform that stacks their kernel (``nn.scan``, ``nn.vmap``) are left out
  (the op-level transform measures them, one layer of the stack at a time).
  """
  found: dict[str, Layer] = {}
  ndims: dict[str, int] = {}  # the kernel's rank as the module sees it
  inputs: list[Any] = []  # held so that ids stay unique while tracing

  def record(next_fun, a, kw, context):
    module = context.module
    if _weight_layer(module, context.method_name) and a:
      path = join("params", *module.path)
      x = a[0]
      if path not in found and jnp.issubdtype(x.dtype, jnp.floating):
        axis = input_axes(module)
        group = next((i for i, seen in enumerate(inputs) if seen is x), len(inputs))
        inputs.append(x)
        size = math.prod(x.shape[i % x.ndim] for i in axis)
        first = list(found.values())[group].group if group < len(found) else len(found)
        found[path] = Layer(path, path + "/kernel", axis, size, first)
        features = getattr(module, "features", 1)
        ndims[path] = len(axis) + (len(features) if isinstance(features, Sequence) else 1)
    return next_fun(*a, **kw)

  def run(v, *a):
    with nn.intercept_methods(record):
      model.apply(v, *a)

  jax.eval_shape(run, variables, *as_args(batch))
  stored = {path_str(p): np.ndim(x) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  kept = [layer for layer in found.values() if stored.get(layer.kernel) == ndims[layer.path]]
  # groups index the first layer of each shared input among those kept
  first = {layer.group: i for i, layer in reversed(list(enumerate(kept)))}
  return [dataclasses.replace(layer, group=first[layer.group]) for layer in kept]


@dataclasses.dataclass
class InputStats:
  """Sums over every row a layer read (all calls, all batches).

  Attributes:
    xtx: ``X^T X`` ``[K, K]`` (only when asked for).
    abs_max: ``max |x|`` per input channel ``[K]``.
    abs_sum: ``sum |x|`` per input channel ``[K]``.
    count: number of rows.
    extra: the sum of ``input_stats``' ``extra`` function, when given.
  """

  xtx: jax.Array | None
  abs_max: jax.Array
  abs_sum: jax.Array
  count: int
  extra: jax.Array | None = None

  @property
  def abs_mean(self) -> jax.Array:
    return self.abs_sum / max(self.count, 1)


def input_stats(
  model: nn.Module,
  variables_fn: Callable[[], Any],
  batches: Iterable[Any],
  group: Sequence[Layer],
  *,
  xtx: bool = True,
  extra: Callable[[Layer, jax.Array, Any], jax.Array] | None = None,
  aux: Any = None,
) -> dict[str, InputStats]:
  """Streams ``batches`` through ``model`` and reduces the inputs of ``group``'s layers.

  One jitted function per group: it returns only the statistics, so XLA drops
  every op after the group's layers (a pass costs the model up to them).

  Args:
    model: the Linen module.
    variables_fn: returns the variables to run (called once, after any earlier
      group was quantized).
    batches: model inputs.
    group: layers measured in this pass.
    xtx: also accumulate ``X^T X`` (GPTQ, AWQ); SmoothQuant needs only maxima.
    extra: ``f(layer, rows, aux[layer.path])`` summed over batches into ``InputStats.extra``.
    aux: arrays ``extra`` reads, by layer path (jit arguments, not constants).

  Returns:
    ``{layer path: InputStats}``.
  """
  wanted = {layer.path: layer for layer in group}

  def stats(v, aux, *a):
    out: dict[str, dict[str, jax.Array]] = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      path = join("params", *module.path)
      if path in wanted and _weight_layer(module, context.method_name) and args:
        r = rows(args[0], wanted[path].axis)
        mine = {
          "abs_max": jnp.max(jnp.abs(r), axis=0),
          "abs_sum": jnp.sum(jnp.abs(r), axis=0),
          "count": jnp.int32(r.shape[0]),
        }
        if extra is not None:
          mine["extra"] = extra(wanted[path], r, aux[path])
        if xtx:
          mine["xtx"] = lax.dot_general(
            r, r, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST
          )
        if path in out:  # a layer called twice (shared weights): both calls count
          prev = out[path]
          mine = {
            key: jnp.maximum(prev[key], val) if key == "abs_max" else prev[key] + val
            for key, val in mine.items()
          }
        out[path] = mine
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      model.apply(v, *a)
    return out

  fn = jax.jit(stats)
  variables = variables_fn()
  total: dict[str, dict[str, Any]] = {}
  for batch in batches:
    got = fn(variables, aux, *as_args(batch))
    for path, s in got.items():
      if path not in total:
        total[path] = dict(s)
        continue
      t = total[path]
      for key, val in s.items():
        t[key] = jnp.maximum(t[key], val) if key == "abs_max" else t[key] + val
  missing = [p for p in wanted if p not in total]
  if missing:
    raise ValueError(f"no batches, or layers never called: {', '.join(missing)}")
  return {
    p: InputStats(s.get("xtx"), s["abs_max"], s["abs_sum"], int(s["count"]), s.get("extra"))
    for p, s in total.items()
  }


def groups(found: Sequence[Layer]) -> list[list[Layer]]:
  """Layers grouped by shared input, in call order."""
  out: dict[int, list[Layer]] = {}
  for layer in found:
    out.setdefault(layer.group, []).append(layer)
  return list(out.values())


PASS_BYTES = 1 << 28
"""Statistics one pass may hold (``X^T X`` and the like, float32): passes over
the float model measure as many layer groups at once as fit in this."""


def xtx_bytes(layer: Layer) -> int:
  """Bytes of one layer's float32 ``X^T X``."""
  return 4 * layer.k * layer.k


def passes(found: Sequence[Layer], bytes_per_layer: Callable[[Layer], int]) -> list[list[Layer]]:
  """Whole groups packed into passes of at most :data:`PASS_BYTES` (one group at least)."""
  out: list[list[Layer]] = []
  size = 0
  for group in groups(found):
    b = sum(bytes_per_layer(layer) for layer in group)
    if out and size + b <= PASS_BYTES:
      out[-1].extend(group)
      size += b
    else:
      out.append(list(group))
      size = b
  return out
