"""Quantized Hugging Face checkpoints (GPTQ, AWQ, compressed-tensors, fp8 blocks) as QArrays.

Each quantized linear layer (a group of tensors sharing a prefix) maps onto the
QArray layout that holds it exactly, as a Flax kernel ``[in, out]``; its
dequantized values equal the format's dequantizer evaluated in float32 bit for bit:

==========================================  ==============================================
GPTQ 4-bit (``qweight`` packed along the     ``asymmetric_per_group_int4`` along the input
input, ``qzeros``, ``scales``, ``g_idx``)    axis: ``(q - z) * s``, ``z = qzeros + 1`` in
                                             the ``gptq`` checkpoint format (``qzeros`` in
                                             ``gptq_v2``); act-order: rows stored
                                             grouped, ``perm`` their order
GPTQ 8-bit                                   ``symmetric_per_block_int8`` codes ``q - 128``
                                             with ``offset = (128 - z) * s`` (exact for
                                             float16 / bfloat16 scales)
AWQ GEMM 4-bit (``qweight`` packed along     the same, columns in AWQ's interleaved
the output, ``qzeros``, ``scales``)          packing order, ``z = qzeros``
compressed-tensors ``pack-quantized`` int4   ``symmetric_per_group_int4`` (stored codes are
(``weight_packed``, ``weight_scale``)        ``q + 8``, as ours); with a
                                             ``weight_zero_point``: asymmetric;
                                             ``weight_g_idx``: act-order, as GPTQ's
compressed-tensors int8 (``weight``,         ``symmetric_per_channel_int8`` (``[out, 1]``
``weight_scale``)                            scales), ``symmetric_per_tensor_int8``,
                                             ``symmetric_per_block_int8`` (groups),
                                             ``asymmetric_per_channel_int8``
compressed-tensors fp8 (``weight`` E4M3)     ``fp8_e4m3_per_channel`` / ``_per_tensor``
fp8 blocks (``weight`` E4M3,                 ``fp8_e4m3_block128``: each 128 x 128 tile's
``weight_scale_inv`` per 128 x 128 tile)     scale repeated over its 128 columns
==========================================  ==============================================

What no layout holds exactly is refused by name, never requantized: 2- and 3-bit
GPTQ, 8-bit AWQ, a ``g_idx`` whose groups differ in size, int4 zero points
outside ``[-8, 23]``, int8 zero points per group. Scales stored as float16 or
bfloat16 become float32 (exactly); the format's own dequantizer multiplies in
that dtype, one rounding more than the float32 values here. :func:`export_gptq`
writes int4 (and 8-bit GPTQ) kernels as GPTQ checkpoints (vLLM and Transformers
read them).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import fileio, nibbles, options, tree_paths
from sensorquant_jax._src.checkpoint import (
  CheckpointError,
  read_safetensors_region,
  safetensors_file_index,
)
from sensorquant_jax._src.qarray import QArray, is_qarray
from sensorquant_jax._src.tree_paths import path_str

GptqFormat = Literal["gptq", "gptq_v2"]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AutoAWQ's GEMM packing: nibble ``i`` of a packed int32 holds column ``AWQ_ORDER[i]``."""
FP8_TILE = 128
"""The tile of fp8 block checkpoints (``weight_block_size``: 128 x 128)."""
_INT4_ZERO = 8  # compressed-tensors stores a signed int4 q as q + 8, as our symmetric codes
_INT8_ZERO = 128  # unsigned 8-bit GPTQ codes held as int8 codes q - 128

_SUFFIXES = (
  "qweight",
  "qzeros",
  "scales",
  "g_idx",
  "weight_packed",
  "weight_shape",
  "weight_scale",
  "weight_zero_point",
  "weight_scale_inv",
  "weight_g_idx",
)


def hf_flax_names(name: str) -> tuple[str, ...]:
  """Hugging Face tensor names as the Flax param tree of the same model.

  ==================================  ======================================
  ``{p}.embed_tokens.weight``         ``{p}/embed_tokens/embedding``
  ``{p}.{...}norm.weight`` (1-D)      ``{p}/{...}norm/weight``
  ``{p}.weight`` (others: linears)    ``{p}/kernel``, transposed to ``[in, out]``
  ``{p}.bias``                        ``{p}/bias``
  ==================================  ======================================

  So ``model.layers.0.self_attn.q_proj`` (with ``qweight``, ``weight`` or
  ``weight_packed``) becomes ``model/layers/0/self_attn/q_proj/kernel`` and
  ``lm_head.weight`` ``lm_head/kernel``: Hugging Face's ``FlaxLlamaForCausalLM``
  layout, and that of any Flax model whose module names follow the checkpoint's.
  """
  keys = tuple(name.split("."))
  if keys[-1] != "weight" or len(keys) < 2:
    return keys
  if keys[-2] in ("embed_tokens", "wte", "word_embeddings"):
    return keys[:-1] + ("embedding",)
  if keys[-2].endswith(("norm", "layernorm", "ln_f")) or keys[-2].startswith("ln_"):
    return keys
  return keys[:-1] + ("kernel",)


class _Tensors:
  """The tensors of one or more safetensors files, each read when asked for."""

  def __init__(self, files: list[str]):
    self.where: dict[str, tuple[str, tuple[int, ...], np.dtype, int]] = {}
    for path in files:
      for name, shape, dtype, offset in safetensors_file_index(path):
        if name in self.where:
          raise CheckpointError(f"{path}: tensor {name!r} is also in {self.where[name][0]}")
        self.where[name] = (path, shape, dtype, offset)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.where[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self.where[name][2]

  def read(self, name: str) -> np.ndarray:
    path, shape, dtype, offset = self.where[name]
    return np.array(read_safetensors_region(path, name, shape, dtype, offset))


def _files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
    if not files:
      raise CheckpointError(f"{path}: no .safetensors files in the folder")
    return files
  return [path]


def _config(path: str) -> dict[str, Any]:
  """The ``quantization_config`` of ``config.json`` in the folder (or beside the file)."""
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    return {}
  try:
    with open(cfg_path, "rb") as f:
      if os.fstat(f.fileno()).st_size > 1 << 24:
        raise CheckpointError(f"{cfg_path}: larger than 16 MiB")
      cfg = json.loads(f.read())
  except (OSError, ValueError, RecursionError) as e:
    raise CheckpointError(f"{cfg_path}: not readable JSON ({fileio.first_line(e)})") from None
  q = cfg.get("quantization_config") if isinstance(cfg, dict) else None
  return q if isinstance(q, dict) else {}


def unpack_int32(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """uint8 codes from int32 words holding ``32 // bits`` codes each along ``axis``.

  Code ``j`` of a word sits at bits ``bits * j`` (the packing GPTQ, AWQ and
  compressed-tensors share; AWQ then interleaves the columns, see :data:`AWQ_ORDER`).
  """
  per = 32 // bits
  words = np.moveaxis(packed.astype(np.int32).view(np.uint32), axis, -1)
  shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
  codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
  codes = codes.reshape(words.shape[:-1] + (words.shape[-1] * per,)).astype(np.uint8)
  return np.moveaxis(codes, -1, axis)


def pack_int32(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
  """Inverse of :func:`unpack_int32` (``axis`` a multiple of ``32 // bits`` long)."""
  per = 32 // bits
  c = np.moveaxis(codes.astype(np.uint32), axis, -1)
  c = c.reshape(c.shape[:-1] + (c.shape[-1] // per, per))
  shifts = np.arange(per, dtype=np.uint32) * np.uint32(bits)
  words = np.bitwise_or.reduce(c << shifts, axis=-1).view(np.int32)
  return np.moveaxis(words, -1, axis)


def _int4_qarray(
  codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, group: int
) -> QArray:
  """A Flax ``[in, out]`` int4 kernel from unsigned codes ``[in, out]`` and per-group arrays."""
  k = codes.shape[0]
  values = nibbles.pack(jnp.asarray(codes), 0, 0)
  scheme = options.INT4 if zero is None else options.ASYMMETRIC_INT4
  zp = None if zero is None else jnp.asarray(zero.astype(np.int8))
  return QArray(
    values, jnp.asarray(scale, jnp.float32), zp, scheme, (-2,), group, np.dtype(np.float32), k % 2
  )


class _Group:
  """One quantized linear layer: its tensors by suffix, read on demand."""

  def __init__(self, path: str, prefix: str, tensors: _Tensors, names: dict[str, str]):
    self.path, self.prefix, self.tensors, self.names = path, prefix, tensors, names

  def fail(self, message: str) -> CheckpointError:
    file = self.tensors.where[next(iter(self.names.values()))][0]  # the file, not the folder
    return CheckpointError(f"{file}: tensor {self.prefix!r}: {message}")

  def shape(self, suffix: str) -> tuple[int, ...]:
    return self.tensors.shape(self.names[suffix])

  def read(self, suffix: str, dtypes: tuple[str, ...], ndim: int | None = None) -> np.ndarray:
    name = self.names.get(suffix)
    if name is None:
      raise self.fail(f"has no {suffix!r}")
    dtype = self.tensors.dtype(name)
    if dtype.name not in dtypes:
      raise self.fail(f"{suffix} is {dtype.name}, expected {' or '.join(dtypes)}")
    shape = self.tensors.shape(name)
    if ndim is not None and len(shape) != ndim:
      raise self.fail(f"{suffix} has shape {shape}, expected {ndim} axes")
    return self.tensors.read(name)

  def scales(self, suffix: str, shape: tuple[int, ...]) -> np.ndarray:
    s = self.read(suffix, ("float32", "float16", "bfloat16")).astype(np.float32)
    if s.size == 1 and len(shape) == 0:
      return s.reshape(())
    if s.shape != shape:
      raise self.fail(f"{suffix} has shape {s.shape}, expected {shape}")
    if not np.all(np.isfinite(s)):
      raise self.fail(f"{suffix} holds NaN or infinite scales")
    return s


_FLOATS = ("float16", "bfloat16", "float32")


def _short_mantissas(s: np.ndarray) -> bool:
  """Whether every float32 has at most 16 significant bits (float16 and bfloat16 values
  do), so that its product with an 8-bit integer is exact in float32."""
  return not np.any(s.view(np.uint32) & np.uint32(0x7F))


def _act_order(
  g: _Group, g_idx: np.ndarray | None, k: int, group: int, n_groups: int
) -> np.ndarray | None:
  """The stored order of the inputs for a ``g_idx`` that is not ``k // group`` (act-order:
  a group's rows are not adjacent; they are stored grouped and ``x`` gathered to match)."""
  if g_idx is None or np.array_equal(g_idx, np.arange(k) // group):
    return None
  perm = np.argsort(g_idx, kind="stable")
  if not np.array_equal(g_idx[perm], np.arange(k) // group):
    raise g.fail(f"g_idx does not put {group} inputs in each of its {n_groups} groups")
  return perm


def _gptq(g: _Group, cfg: Mapping[str, Any]) -> tuple[str, QArray]:
  fmt = cfg.get("checkpoint_format", "gptq")
  if fmt not in ("gptq", "gptq_v2"):
    raise g.fail(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
  qweight = g.read("qweight", ("int32",), 2)
  scales_shape = g.shape("scales")
  if len(scales_shape) != 2:
    raise g.fail(f"scales has shape {scales_shape}, expected [groups, out]")
  n_groups, n = scales_shape
  g_idx = None
  if "g_idx" in g.names:
    g_idx = g.read("g_idx", ("int32", "int64"), 1)
    k = g_idx.shape[0]
    bits = 32 * qweight.shape[0] // max(k, 1)
  else:
    bits = int(cfg.get("bits", 4))
    k = qweight.shape[0] * 32 // bits if bits in (4, 8) else 0
  if "bits" in cfg and cfg["bits"] != bits:
    raise g.fail(f"the config says {cfg['bits']} bits; the tensors hold {bits}")
  if bits not in (4, 8):
    raise g.fail(f"{bits}-bit GPTQ has no exact layout here (4 and 8 bits do)")
  per = 32 // bits
  if (
    qweight.shape != (k // per, n) or k % per or n % per or n_groups == 0 or k == 0 or k % n_groups
  ):
    raise g.fail(f"qweight {qweight.shape} and scales {scales_shape} do not fit together")
  group = k // n_groups
  codes = unpack_int32(qweight, bits, 0)  # [in, out], the inputs in their own order
  perm = _act_order(g, g_idx, k, group, n_groups)
  if perm is not None:
    codes = codes[perm]
  scale = g.scales("scales", (n_groups, n))
  qzeros = g.read("qzeros", ("int32",), 2)
  if qzeros.shape != (n_groups, n // per):
    raise g.fail(f"qzeros has shape {qzeros.shape}, expected {(n_groups, n // per)}")
  zero = unpack_int32(qzeros, bits, 1).astype(np.int32)
  if fmt == "gptq":  # v1 stores z - 1
    zero = zero + 1
  order = ", act-order" if perm is not None else ""
  if bits == 4:
    q = _int4_qarray(codes, scale, zero, group)
  else:
    # int8 codes q - 128 and (q - z) s = fl((q - 128) s) + fl((128 - z) s): both products
    # exact for scales of at most 16 significant bits, so their sum rounds as (q - z) s.
    if not _short_mantissas(scale):
      raise g.fail("8-bit scales with more than 16 significant bits have no exact layout")
    offset = (_INT8_ZERO - zero).astype(np.float32) * scale
    q = QArray(
      jnp.asarray((codes.astype(np.int16) - _INT8_ZERO).astype(np.int8)),
      jnp.asarray(scale),
      None,
      options.PER_BLOCK,
      (-2,),
      group,
      np.dtype(np.float32),
      offset=jnp.asarray(offset),
    )
  if perm is not None:
    q = dataclasses.replace(q, perm=jnp.asarray(perm, jnp.int32))
  return f"gptq int{bits} g{group}{order}", q


def _awq(g: _Group, cfg: Mapping[str, Any]) -> tuple[str, QArray]:
  qweight = g.read("qweight", ("int32",), 2)
  scales_shape = g.shape("scales")
  if len(scales_shape) != 2:
    raise g.fail(f"scales has shape {scales_shape}, expected [groups, out]")
  n_groups, n = scales_shape
  k = qweight.shape[0]
  if n != qweight.shape[1] * 8:
    bits = 32 * qweight.shape[1] // max(n, 1)
    raise g.fail(f"{bits}-bit AWQ has no exact layout here yet (4-bit is supported)")
  if n_groups == 0 or k == 0 or k % n_groups:
    raise g.fail(f"qweight {qweight.shape} and scales {scales_shape} do not fit together")
  group = k // n_groups
  inverse = np.argsort(AWQ_ORDER)

  def columns(packed):  # AWQ's interleaved nibbles back to column order
    c = unpack_int32(packed, 4, 1)
    return c.reshape(c.shape[0], -1, 8)[:, :, inverse].reshape(c.shape)

  codes = columns(qweight)
  scale = g.scales("scales", (n_groups, n))
  qzeros = g.read("qzeros", ("int32",), 2)
  if qzeros.shape != (n_groups, n // 8):
    raise g.fail(f"qzeros has shape {qzeros.shape}, expected {(n_groups, n // 8)}")
  return f"awq int4 g{group}", _int4_qarray(codes, scale, columns(qzeros), group)


def _zero_points(g: _Group, shape: tuple[int, ...]) -> np.ndarray | None:
  """compressed-tensors' ``weight_zero_point`` (``None`` when absent or all zero)."""
  if "weight_zero_point" not in g.names:
    return None
  z = g.read("weight_zero_point", ("int8", "int32", "float16", "bfloat16", "float32"))
  if z.size == 1 and len(shape) == 0:
    z = z.reshape(())
  if z.shape != shape:
    raise g.fail(f"weight_zero_point has shape {z.shape}, expected {shape} (unpacked)")
  if not np.all(np.isfinite(z)) or not np.array_equal(z, np.round(z)):
    raise g.fail("weight_zero_point holds values that are not integers")
  return None if not np.any(z) else z.astype(np.int32)


def _packed(g: _Group, cfg: Mapping[str, Any]) -> tuple[str, QArray]:
  packed = g.read("weight_packed", ("int32",), 2)
  shape = g.read("weight_shape", ("int32", "int64"), 1)
  if shape.shape != (2,):
    raise g.fail(f"weight_shape {shape.tolist()} is not [out, in]")
  n, k = (int(d) for d in shape)
  if n <= 0 or k <= 0 or packed.shape != (n, -(-k // 8)):
    raise g.fail(f"weight_packed {packed.shape} does not hold int4 of shape {(n, k)}")
  codes = unpack_int32(packed, 4, 1)[:, :k].T  # [in, out]
  scale_shape = g.shape("weight_scale")
  if len(scale_shape) != 2 or scale_shape[0] != n or scale_shape[1] == 0:
    raise g.fail(f"weight_scale has shape {scale_shape}, expected [{n}, groups]")
  n_groups = scale_shape[1]
  group = _group_size(g, k, n_groups, cfg)
  scale = g.scales("weight_scale", (n, n_groups)).T
  zero = _zero_points(g, (n, n_groups))
  if zero is not None:  # codes q + 8: (q - z) = (code - (z + 8))
    zero = zero.T + _INT4_ZERO
    if zero.min() < -8 or zero.max() > 23:
      raise g.fail("weight_zero_point outside [-16, 15]")
  g_idx = None
  if "weight_g_idx" in g.names:
    g_idx = g.read("weight_g_idx", ("int32", "int64"), 1)
    if g_idx.shape != (k,):
      raise g.fail(f"weight_g_idx has shape {g_idx.shape}, expected ({k},)")
  perm = _act_order(g, g_idx, k, group, n_groups)
  what = "channel" if n_groups == 1 else f"g{group}"
  q = _int4_qarray(codes if perm is None else codes[perm], scale, zero, group)
  if perm is None:
    return f"compressed-tensors int4 {what}", q
  q = dataclasses.replace(q, perm=jnp.asarray(perm, jnp.int32))
  return f"compressed-tensors int4 {what}, act-order", q


def _config_group_size(cfg: Mapping[str, Any]) -> int | None:
  """compressed-tensors' ``group_size`` when its config groups agree on one."""
  sizes = set()
  groups = cfg.get("config_groups")
  for scheme in groups.values() if isinstance(groups, dict) else ():
    weights = scheme.get("weights") if isinstance(scheme, dict) else None
    size = weights.get("group_size") if isinstance(weights, dict) else None
    if isinstance(size, int) and size > 0:
      sizes.add(size)
  return sizes.pop() if len(sizes) == 1 else None


def _group_size(g: _Group, k: int, n_groups: int, cfg: Mapping[str, Any]) -> int:
  """The inputs per group of ``n_groups`` groups over ``k`` inputs (the last one may be
  partial): the config's ``group_size``, else ``k / n_groups`` when whole, else the power
  of two that gives ``n_groups`` groups."""
  candidates = [_config_group_size(cfg)]
  if k % n_groups == 0:
    candidates.append(k // n_groups)
  candidates += [1 << b for b in range(31)]
  for size in candidates:
    if size and -(-k // size) == n_groups:
      return size
  raise g.fail(f"{n_groups} groups do not fit {k} inputs")


def _int8_or_fp8(g: _Group, cfg: Mapping[str, Any]) -> tuple[str, QArray]:
  name = g.names["weight"]
  dtype = g.tensors.dtype(name)
  shape = g.tensors.shape(name)
  if len(shape) != 2:
    raise g.fail(f"weight has shape {shape}, expected [out, in]")
  n, k = shape
  w = g.read("weight", (dtype.name,)).T  # [in, out]
  fp8 = dtype.name == "float8_e4m3fn"
  if fp8 and np.any(np.isnan(w.astype(np.float32))):
    raise g.fail("weight holds NaN")
  if "weight_scale_inv" in g.names:  # fp8 blocks: one scale per 128 x 128 tile
    if not fp8:
      raise g.fail(f"weight_scale_inv with a {dtype.name} weight")
    tiles = (-(-n // FP8_TILE), -(-k // FP8_TILE))
    s = g.scales("weight_scale_inv", tiles)
    scale = np.repeat(s.T, FP8_TILE, axis=1)[:, :n]  # [k blocks, out]
    q = QArray(jnp.asarray(w), jnp.asarray(scale), None, options.FP8_BLOCK, (-2,), FP8_TILE)
    return "fp8 block128", q
  scale_shape = g.shape("weight_scale")
  size = int(np.prod(scale_shape, dtype=np.int64))
  axes: tuple[int, ...] = (-2,)
  block: int | None = None
  if size == 1:
    scale, axes, what = g.scales("weight_scale", scale_shape).reshape(1, 1), (-2, -1), "tensor"
  elif tuple(scale_shape) in ((n, 1), (n,)):
    scale, what = g.scales("weight_scale", tuple(scale_shape)).reshape(1, n), "channel"
  elif len(scale_shape) == 2 and scale_shape[0] == n and not fp8:
    n_groups = scale_shape[1]
    block = _group_size(g, k, n_groups, cfg)
    scale, what = g.scales("weight_scale", tuple(scale_shape)).T, f"g{block}"
  else:
    raise g.fail(f"weight_scale of shape {scale_shape} for a weight {shape} is not supported")
  zero = _zero_points(g, tuple(scale_shape))
  if fp8:
    if zero is not None:
      raise g.fail("fp8 weights with zero points are not supported")
    scheme = options.FP8_PER_TENSOR if what == "tensor" else options.FP8_PER_CHANNEL
    return f"compressed-tensors fp8 {what}", QArray(
      jnp.asarray(w), jnp.asarray(scale), None, scheme, axes, None
    )
  if dtype.name != "int8":
    raise g.fail(f"weight is {dtype.name}, expected int8 or float8_e4m3fn")
  zp = None
  if zero is None:
    scheme = {"tensor": options.PER_TENSOR, "channel": options.PER_CHANNEL}.get(
      what, options.PER_BLOCK
    )
  elif what == "channel":
    if zero.min() < -128 or zero.max() > 127:
      raise g.fail("weight_zero_point outside int8")
    scheme, zp = options.ASYMMETRIC_PER_CHANNEL, jnp.asarray(zero.reshape(1, n).astype(np.int8))
  else:
    raise g.fail(f"int8 zero points per {what} have no exact layout here yet")
  return f"compressed-tensors int8 {what}", QArray(
    jnp.asarray(w), jnp.asarray(scale), zp, scheme, axes, block
  )


def _kind(names: dict[str, str], dtype: Callable[[str], np.dtype]) -> str | None:
  """Which format a group of tensors is in, from its suffixes (and the weight's dtype)."""
  if "qweight" in names:
    return "gptq_or_awq"
  if "weight_packed" in names:
    return "pack-quantized"
  if "weight" in names and ("weight_scale" in names or "weight_scale_inv" in names):
    if dtype(names["weight"]).name in ("int8", "float8_e4m3fn"):
      return "int8_or_fp8"
  return None


def read_safetensors(
  path: str,
  *,
  rename: Callable[[str], tuple[str, ...] | None],
) -> tuple[dict[str, Any], str, dict[str, Any], dict[str, str]]:
  """``(params, format, metadata, types)`` of a quantized safetensors checkpoint.

  ``path`` is a ``.safetensors`` file or a folder of them (shards), with the
  model's ``config.json`` beside them when there is one (its
  ``quantization_config`` says GPTQ's bits and checkpoint format; without one
  the format is read off the tensors: 4-bit, ``gptq``).
  """
  cfg = _config(path)
  tensors = _Tensors(_files(path))
  groups: dict[str, dict[str, str]] = {}
  for name in tensors.where:
    prefix, _, suffix = name.rpartition(".")
    if suffix in _SUFFIXES or suffix == "weight" or suffix == "input_scale":
      groups.setdefault(prefix, {})[suffix] = name
  method = str(cfg.get("quant_method", ""))
  used: set[str] = set()
  leaves: list[tuple[tuple[str, ...], str, Any, str]] = []
  formats = set()
  for prefix, names in groups.items():
    kind = _kind(names, tensors.dtype)
    if kind is None:
      continue
    g = _Group(path, prefix, tensors, names)
    if kind == "gptq_or_awq":
      awq = method == "awq" or (method != "gptq" and "g_idx" not in names and _awq_shaped(g))
      kind = "awq" if awq else "gptq"
      what, q = (_awq if awq else _gptq)(g, cfg)
    elif kind == "pack-quantized":
      what, q = _packed(g, cfg)
      kind = "compressed-tensors"
    else:
      what, q = _int8_or_fp8(g, cfg)
      kind = "fp8" if "weight_scale_inv" in names else "compressed-tensors"
    formats.add(kind)
    used.update(names.values())
    if "input_scale" in names:
      used.discard(names["input_scale"])  # a static activation scale: kept as a float leaf
    keys = rename(prefix + ".weight")
    if keys is None:
      continue
    leaves.append((keys, prefix, q, what))
  types = {prefix: what for _, prefix, _, what in leaves}
  floats = []
  for name in tensors.where:
    if name in used:
      continue
    keys = rename(name)
    if keys is None:
      continue
    x = tensors.read(name)
    if keys[-1] == "kernel" and name.endswith(".weight"):  # Hugging Face's [out, in]
      if x.ndim != 2:
        raise CheckpointError(f"{path}: tensor {name!r}: a kernel must be 2-D, got {x.shape}")
      x = np.ascontiguousarray(x.T)
    types[name] = x.dtype.name
    floats.append((keys, name, x))
  placed = [(k, q) for k, _, q, _ in leaves] + [(k, x) for k, _, x in floats]
  try:
    params = tree_paths.nest(["/".join(k) for k, _ in placed], [x for _, x in placed])
  except ValueError as e:  # two tensors renamed onto one path
    raise CheckpointError(f"{path}: {e}") from None
  fmt = "+".join(sorted(formats)) if formats else "safetensors"
  return params, fmt, dict(cfg), types


def _awq_shaped(g: _Group) -> bool:
  """AWQ packs ``qweight`` along the output (``[in, out / 8]``), GPTQ along the input."""
  scales = g.shape("scales")
  return len(scales) == 2 and g.shape("qweight")[1] != scales[1]


def _gptq_tensors(where: str, q: QArray, fmt: GptqFormat) -> tuple[int, dict[str, np.ndarray]]:
  """A 2-D kernel ``[in, out]`` as GPTQ's tensors and its bits (raises ValueError).

  int4 kernels with groups along the input axis, and int8 block kernels whose offset
  is ``(128 - z) * scale`` (8-bit GPTQ as :func:`load_quantized` reads it).
  """
  int8 = q.scheme == options.PER_BLOCK and q.offset is not None
  if (q.scheme not in options.INT4_SCHEMES and not int8) or q.ndim != 2 or q.axes[0] % 2:
    raise ValueError(
      f"{where}: {q.scheme} with axes {q.axes} is not a GPTQ kernel (int4 groups, or int8 "
      "blocks with GPTQ's offsets, along the input axis of an [in, out] kernel)"
    )
  if q.input_scale is not None:
    raise ValueError(f"{where}: an input_scale has no place in a GPTQ checkpoint")
  bits = 8 if int8 else 4
  per = 32 // bits
  k, n = q.shape
  group = int(q.block_size or k)
  if k % group or k % per or n % per:
    raise ValueError(
      f"{where}: GPTQ needs inputs in whole groups and sizes that are multiples of {per}"
    )
  scale = np.asarray(q.scale, np.float32)
  if not np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
    raise ValueError(f"{where}: GPTQ stores float16 scales; these are not float16 values")
  codes = np.asarray(q.codes()).astype(np.int32)
  if int8:
    codes = codes + _INT8_ZERO
    steps = np.asarray(q.offset, np.float32) / np.where(scale == 0, 1, scale)
    zero = _INT8_ZERO - np.round(steps).astype(np.int32)
    if not np.array_equal((_INT8_ZERO - zero).astype(np.float32) * scale, np.asarray(q.offset)):
      raise ValueError(f"{where}: its offsets are not whole steps of its scales")
  elif q.zero_point is None:
    codes = codes + _INT4_ZERO
    zero = np.full(scale.shape, _INT4_ZERO, np.int32)
  else:
    if q.offset is not None:
      raise ValueError(f"{where}: GPTQ has no int4 offsets (GGUF Q4_1 / Q4_K)")
    zero = np.asarray(q.zero_point, np.int32)
  stored = zero - 1 if fmt == "gptq" else zero
  top = (1 << bits) - 1
  if stored.min() < 0 or stored.max() > top:
    raise ValueError(
      f"{where}: zero points {int(zero.min())}..{int(zero.max())} do not fit the {fmt} "
      f"format (gptq stores z - 1 in [0, {top}]; gptq_v2 stores z)"
    )
  g_idx = (np.arange(k) // group).astype(np.int32)
  if q.perm is not None:  # back to the inputs' own order, each with its group
    perm = np.asarray(q.perm)
    codes = codes[np.argsort(perm)]
    g_idx[perm] = np.arange(k, dtype=np.int32) // group
  return bits, {
    "qweight": pack_int32(codes, bits, 0),
    "qzeros": pack_int32(stored, bits, 1),
    "scales": scale.astype(np.float16),
    "g_idx": g_idx,
  }


def export_gptq(
  path: str | os.PathLike,
  params: Any,
  *,
  checkpoint_format: GptqFormat = "gptq",
  name_fn: Callable[[str], str] | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes int4 (and 8-bit GPTQ) kernels as a GPTQ checkpoint (one ``.safetensors`` file),
  exactly.

  Each 2-D int4 QArray with groups along the input axis (``asymmetric_per_group_int4``,
  or symmetric, written with zero points 8; a ``perm`` as act-order's ``g_idx``)
  becomes ``{name}.qweight`` / ``qzeros`` / ``scales`` / ``g_idx``, when its scales
  are float16 values (8-bit: the int8 block kernels 8-bit GPTQ is read as); other
  leaves (float arrays) are written as they are (2-D ``kernel`` leaves as
  ``[out, in]`` ``weight``). :func:`load_quantized` reads the file back to the
  same QArrays.

  Args:
    path: the ``.safetensors`` file to write (atomically).
    params: a tree of QArrays and float arrays (a Flax ``[in, out]`` layout).
    checkpoint_format: ``"gptq"`` (stores ``z - 1``: zero points 1 to 16) or
      ``"gptq_v2"`` (stores ``z``: 0 to 15).
    name_fn: a leaf's tensor prefix from its path (``"a/b/kernel"``); default:
      the path without its last key, ``/`` -> ``.``.
    overwrite: replace an existing safetensors file at ``path``.

  Returns:
    The ``quantization_config`` to put in the model's ``config.json`` (``bits``,
    ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format``, ``quant_method``).

  Raises:
    ValueError: a QArray GPTQ does not hold exactly (named, with the reason), or a
      destination that is not a safetensors file (:class:`DestinationError`).
  """
  from safetensors.numpy import save

  dest = fileio.check_file_destination(
    os.fspath(path), overwrite=overwrite, is_ours=_is_safetensors, kind="safetensors file"
  )
  prefix_of = name_fn or (lambda p: ".".join(p.split("/")[:-1]) or p)
  out: dict[str, np.ndarray] = {}
  groups: set[int] = set()
  bits: set[int] = set()
  act_order = False
  for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]:
    where = path_str(p)
    if is_qarray(x):
      b, tensors = _gptq_tensors(where, x, checkpoint_format)
      for suffix, a in tensors.items():
        out[f"{prefix_of(where)}.{suffix}"] = a
      groups.add(int(x.block_size or x.shape[0]))
      bits.add(b)
      act_order |= x.perm is not None
      continue
    a = np.asarray(x)
    if where.endswith("kernel") and a.ndim == 2:
      out[f"{prefix_of(where)}.weight"] = np.ascontiguousarray(a.T)
    else:
      out[where.replace("/", ".")] = np.ascontiguousarray(a)
  if len(groups) > 1 or len(bits) > 1:
    raise ValueError(
      f"a GPTQ checkpoint has one group size and width; these kernels have groups "
      f"{sorted(groups)}, bits {sorted(bits)}"
    )
  tree_paths.check_paths([k.replace(".", "/") for k in out])
  data = save(out)
  fileio.write_file_atomic(dest, lambda f: f.write(data))
  return {
    "quant_method": "gptq",
    "bits": bits.pop() if bits else 4,
    "group_size": groups.pop() if groups else 128,
    "desc_act": act_order,
    "sym": False,
    "checkpoint_format": checkpoint_format,
  }


def _is_safetensors(path: str) -> bool:
  try:
    safetensors_file_index(path)
    return True
  except CheckpointError:
    return False
