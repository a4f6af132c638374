"""GGUF files (llama.cpp) read into QArrays exactly, through the ``gguf`` package's reader.

Each tensor maps onto the QArray layout that holds its type exactly (the
dequantized values equal the ``gguf`` package's dequantizer bit for bit):

========  =========================================================================
``F32``   a float32 array; ``F16`` and ``BF16`` keep their dtype
``Q8_0``  ``symmetric_per_block_int8``, blocks of 32 along the last axis: the
          block's int8 codes and its float16 scale ``d`` (as float32)
``Q4_0``  ``asymmetric_per_group_int4``, groups of 32 along the last axis, zero
          point 8: ``(q - 8) * d``, ``q`` in ``[0, 15]``
``Q4_1``  ``asymmetric_per_group_int4``, groups of 32, zero points 0 and an
          ``offset``: ``fl(q d) + m`` with float16 ``d`` and ``m``
``Q5_0``  ``symmetric_per_block_int8``, blocks of 32: codes ``q - 16`` in
          ``[-16, 15]`` (5 bits held in 8) and ``d``
``Q4_K``  ``asymmetric_per_group_int4``, groups of 32 (the sub-blocks), zero
          points 0: scale ``fl(d sc)``, offset ``-fl(dmin m)`` (6-bit ``sc``, ``m``)
``Q6_K``  ``symmetric_per_block_int8``, blocks of 16: codes ``q - 32`` in
          ``[-32, 31]`` (6 bits held in 8), scale ``fl(d * sc)``
========  =========================================================================

Other types (Q5_1, Q2_K, Q3_K, Q5_K, the I-quants, ...) are refused by name,
never requantized. Arrays keep GGUF's order (numpy's: ``ne[0]``, the contiguous axis
that blocks run along, last), so a Linear weight is ``[out, in]``; transpose it
(``qlayout.transpose``) for a Flax ``[in, out]`` kernel.

:func:`export_gguf` writes the other way: QArrays that Q8_0 or Q4_0 hold exactly
(blocks of 32, float16-exact scales; symmetric int4 codes become ``c + 8``) as
they are, with the block axis moved last.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sensorquant_jax._src import fileio, nibbles, qlayout, tree_paths
from sensorquant_jax._src.checkpoint import CheckpointError
from sensorquant_jax._src.convert import RequantizationWarning
from sensorquant_jax._src.options import ASYMMETRIC_INT4, INT4, PER_BLOCK
from sensorquant_jax._src.qarray import QArray, is_qarray
from sensorquant_jax._src.tree_paths import path_str

GGUF_BLOCK = 32
"""Values per block of Q8_0 and Q4_0 (``QK8_0``, ``QK4_0`` in ggml)."""
Q4_0_ZERO = 8
"""Q4_0's implicit zero point: a weight is ``(q - 8) * d``."""


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Header:
  """A bounds-checked cursor over a GGUF file's header (memory-mapped)."""

  def __init__(self, path: str, data: Any):
    self.path, self.data, self.at = path, data, 0

  def take(self, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    if self.at + size > len(self.data):
      raise CheckpointError(f"{self.path}: not a readable GGUF file (the header is cut short)")
    out = struct.unpack_from(fmt, self.data, self.at)
    self.at += size
    return out[0] if len(out) == 1 else out

  def skip(self, n: int) -> None:
    if n < 0 or self.at + n > len(self.data):
      raise CheckpointError(f"{self.path}: not a readable GGUF file (the header is cut short)")
    self.at += n

  def string(self) -> str:
    n = self.take("<Q")
    self.skip(n)
    return bytes(self.data[self.at - n : self.at]).decode("utf-8", "replace")

  def value(self, kind: int, depth: int = 0) -> Any:
    """Skips one value; returns it when it is a small integer (``general.alignment``)."""
    if kind in _SCALAR_SIZES:
      if kind in (4, 5, 10, 11):
        return self.take({4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[kind])
      return self.skip(_SCALAR_SIZES[kind])
    if kind == _STRING:
      return self.skip(self.take("<Q"))
    if kind == _ARRAY and depth < 4:
      item, n = self.take("<I"), self.take("<Q")
      if item in _SCALAR_SIZES:
        return self.skip(n * _SCALAR_SIZES[item])
      if n > len(self.data):
        raise CheckpointError(f"{self.path}: not a readable GGUF file (an array of {n} items)")
      for _ in range(n):
        self.value(item, depth + 1)
      return None
    raise CheckpointError(f"{self.path}: not a readable GGUF file (value type {kind})")


def check_layout(path: str) -> None:
  """Checks every tensor's type, shape and data against the file before the ``gguf``
  reader maps them, so a hostile file ends in one error naming the file and tensor.

  Raises:
    CheckpointError: a truncated or inconsistent header, or a tensor whose type is
      unknown, whose shape is absurd or whose data lies outside the file.
  """
  import gguf

  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size < 24:
      raise CheckpointError(f"{path}: not a readable GGUF file (shorter than its header)")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
      h = _Header(path, data)
      h.skip(4)
      version, n_tensors, n_kv = h.take("<I"), h.take("<Q"), h.take("<Q")
      if version not in (2, 3) or n_tensors > size or n_kv > size:
        raise CheckpointError(
          f"{path}: not a readable GGUF file (version {version}, {n_tensors} tensors, "
          f"{n_kv} key-values)"
        )
      alignment = 32
      for _ in range(n_kv):
        key, kind = h.string(), h.take("<I")
        got = h.value(kind)
        if key == "general.alignment" and isinstance(got, int):
          alignment = got
      if alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: not a readable GGUF file (alignment {alignment})")
      infos = []
      for _ in range(n_tensors):
        name, n_dims = h.string(), h.take("<I")
        if n_dims > _MAX_DIMS:
          raise CheckpointError(f"{path}: tensor {name!r}: {n_dims} dimensions")
        dims = [h.take("<Q") for _ in range(n_dims)]
        infos.append((name, dims, h.take("<I"), h.take("<Q")))
      start = -(-h.at // alignment) * alignment
  for name, dims, kind, offset in infos:
    where = f"{path}: tensor {name!r}"
    try:
      block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
      raise CheckpointError(f"{where}: unknown type {kind}") from None
    count = math.prod(dims)
    if dims and dims[0] % block:
      raise CheckpointError(f"{where}: rows of {dims[0]} are not whole blocks of {block}")
    end = start + offset + count // block * nbytes
    if end > size:
      raise CheckpointError(
        f"{where}: shape {tuple(reversed(dims))} at offset {offset} lies past the file's "
        f"{size} bytes"
      )


def _reader(path: str) -> Any:
  try:
    import gguf
  except ImportError as e:  # pragma: no cover - the test extra installs it
    raise ImportError(
      "reading GGUF files needs the gguf package: pip install 'sensorquant_jax[gguf]'"
    ) from e
  check_layout(path)
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


def _field_value(field: Any) -> Any:
  try:
    return field.contents()
  except Exception:  # a malformed value: keep the key, say so
    return None


def default_rename(name: str) -> tuple[str, ...]:
  """``"blk.0.attn_q.weight"`` -> ``("blk", "0", "attn_q", "weight")``."""
  return tuple(name.split("."))


_LLAMA_LAYER = {
  "attn_norm.weight": ("input_layernorm", "weight"),
  "attn_q.weight": ("self_attn", "q_proj", "kernel"),
  "attn_k.weight": ("self_attn", "k_proj", "kernel"),
  "attn_v.weight": ("self_attn", "v_proj", "kernel"),
  "attn_output.weight": ("self_attn", "o_proj", "kernel"),
  "ffn_norm.weight": ("post_attention_layernorm", "weight"),
  "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
  "ffn_up.weight": ("mlp", "up_proj", "kernel"),
  "ffn_down.weight": ("mlp", "down_proj", "kernel"),
}
_LLAMA_TOP = {
  "token_embd.weight": ("model", "embed_tokens", "embedding"),
  "output_norm.weight": ("model", "norm", "weight"),
  "output.weight": ("lm_head", "kernel"),
}


def gguf_llama_names(name: str) -> tuple[str, ...]:
  """llama.cpp's Llama tensor names as the Flax Llama param tree (Hugging Face's
  ``FlaxLlamaForCausalLM`` layout), for :func:`load_quantized`'s ``rename``.

  ============================  ==================================================
  ``token_embd.weight``         ``model/embed_tokens/embedding``
  ``blk.{i}.attn_norm.weight``  ``model/layers/{i}/input_layernorm/weight``
  ``blk.{i}.attn_q.weight``     ``model/layers/{i}/self_attn/q_proj/kernel`` (k, v;
                                ``attn_output``: ``o_proj``)
  ``blk.{i}.ffn_norm.weight``   ``model/layers/{i}/post_attention_layernorm/weight``
  ``blk.{i}.ffn_gate.weight``   ``model/layers/{i}/mlp/gate_proj/kernel`` (up, down)
  ``output_norm.weight``        ``model/norm/weight``
  ``output.weight``             ``lm_head/kernel``
  ============================  ==================================================

  Other names go to ``unmapped/{name}`` (never dropped). ``kernel`` leaves are
  transposed to Flax's ``[in, out]``. llama.cpp's converter permutes the rows of
  ``attn_q`` / ``attn_k`` for its rotary embedding; a model whose rotary pairs
  are the two halves of each head (Hugging Face's) needs them permuted back.
  """
  if name in _LLAMA_TOP:
    return _LLAMA_TOP[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LLAMA_LAYER:
    return ("model", "layers", parts[1], *_LLAMA_LAYER[parts[2]])
  return ("unmapped", name)


def _rope_rows(out: int, heads: int) -> np.ndarray:
  """The GGUF rows of llama.cpp's rotary permutation in Hugging Face's order.

  llama.cpp's converter (``LlamaModel.permute``) stores each head's rows interleaved,
  ``reshape(heads, 2, d / 2).swapaxes(1, 2)``; Hugging Face's models rotate the two
  halves of each head. ``gguf[rows]`` undoes it.
  """
  d = out // heads
  return np.arange(out).reshape(heads, d // 2, 2).swapaxes(1, 2).reshape(out)


def gguf_llama_unpermute(params: Any, *, heads: int, kv_heads: int | None = None) -> Any:
  """Undoes llama.cpp's rotary row permutation of ``q_proj`` / ``k_proj`` in a tree read
  with :func:`gguf_llama_names`, exactly (a permutation of output columns, codes and
  scales alike), so that a model with Hugging Face's rotary embedding (the two halves
  of each head) runs on it.

  Args:
    params: the tree (``model/layers/{i}/self_attn/{q,k}_proj/kernel``, ``[in, out]``).
    heads: query heads (``llama.attention.head_count`` in the file's metadata).
    kv_heads: key/value heads (``llama.attention.head_count_kv``); default ``heads``.

  Returns:
    The tree with those kernels' output columns in Hugging Face's order.
  """
  kv_heads = kv_heads or heads

  def fix(path: Any, x: Any) -> Any:
    where = path_str(path).split("/")
    if len(where) < 2 or where[-1] != "kernel" or where[-2] not in ("q_proj", "k_proj"):
      return x
    h = heads if where[-2] == "q_proj" else kv_heads
    out = x.shape[-1]
    if out % (2 * h):
      raise ValueError(f"{'/'.join(where)}: {out} outputs are not {h} heads of even size")
    rows = jnp.asarray(_rope_rows(out, h))
    return qlayout.take(x, rows, -1) if is_qarray(x) else jnp.take(jnp.asarray(x), rows, axis=-1)

  return jax.tree_util.tree_map_with_path(fix, params, is_leaf=is_qarray)


def _blocks(raw: np.ndarray, shape: tuple[int, ...], block: int, nbytes: int) -> np.ndarray:
  """The raw bytes of a block-quantized tensor as ``[*rows, n_blocks, nbytes]``."""
  return raw.reshape(shape[:-1] + (shape[-1] // block, nbytes))


def _f16(b: np.ndarray) -> np.ndarray:
  """Two bytes (the last axis) as a float16 value, as float32."""
  return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _int8_blocks(codes: np.ndarray, d: np.ndarray, block: int) -> QArray:
  return QArray(
    jnp.asarray(codes.astype(np.int8)), jnp.asarray(d), None, PER_BLOCK, (-1,), block,
    np.dtype(np.float32),
  )  # fmt: skip


def _q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> QArray:
  blocks = _blocks(raw, shape, GGUF_BLOCK, 2 + GGUF_BLOCK)
  q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(shape)
  return _int8_blocks(q, _f16(blocks[..., :2]), GGUF_BLOCK)


def _low_high(packed: np.ndarray) -> np.ndarray:
  """ggml's nibble order: a run's first half in the low nibbles, its second in the high."""
  return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _q4_0(raw: np.ndarray, shape: tuple[int, ...]) -> QArray:
  blocks = _blocks(raw, shape, GGUF_BLOCK, 2 + GGUF_BLOCK // 2)
  d = _f16(blocks[..., :2])
  codes = _low_high(blocks[..., 2:]).reshape(shape)
  zero = jnp.full(d.shape, Q4_0_ZERO, jnp.int8)
  values = nibbles.pack(jnp.asarray(codes), len(shape) - 1, 0)
  return QArray(
    values, jnp.asarray(d), zero, ASYMMETRIC_INT4, (-1,), GGUF_BLOCK, np.dtype(np.float32), 0
  )


def _q5_0(raw: np.ndarray, shape: tuple[int, ...]) -> QArray:
  """``(q - 16) * d`` with 5-bit ``q``: int8 codes in ``[-16, 15]``, blocks of 32."""
  blocks = _blocks(raw, shape, GGUF_BLOCK, 2 + 4 + GGUF_BLOCK // 2)
  high = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")  # bit j: value j's fifth bit
  high = (high >> np.arange(GGUF_BLOCK, dtype=np.uint32)) & 1
  codes = (_low_high(blocks[..., 6:]) | (high.astype(np.uint8) << 4)).astype(np.int16) - 16
  return _int8_blocks(codes.reshape(shape), _f16(blocks[..., :2]), GGUF_BLOCK)


def _offset_int4(codes: np.ndarray, d: np.ndarray, m: np.ndarray, group: int) -> QArray:
  """Unsigned int4 codes with ``fl(d q) + m`` per group: zero points 0 and an offset."""
  shape = codes.shape
  values = nibbles.pack(jnp.asarray(codes), len(shape) - 1, 0)
  zero = jnp.zeros(d.shape, jnp.int8)
  return QArray(
    values, jnp.asarray(d), zero, ASYMMETRIC_INT4, (-1,), group, np.dtype(np.float32), 0,
    offset=jnp.asarray(m),
  )  # fmt: skip


def _q4_1(raw: np.ndarray, shape: tuple[int, ...]) -> QArray:
  """``fl(d q) + m``, ``q`` in ``[0, 15]``, float16 ``d`` and ``m`` per block of 32."""
  blocks = _blocks(raw, shape, GGUF_BLOCK, 4 + GGUF_BLOCK // 2)
  codes = _low_high(blocks[..., 4:]).reshape(shape)
  return _offset_int4(codes, _f16(blocks[..., :2]), _f16(blocks[..., 2:4]), GGUF_BLOCK)


K_BLOCK = 256
"""Values per K-quant super-block (``QK_K``)."""
Q6_K_GROUP = 16
"""Values per Q6_K sub-block scale."""


def _q6_k(raw: np.ndarray, shape: tuple[int, ...]) -> QArray:
  """``(q - 32) * (d * sc)`` with 6-bit ``q``: int8 codes in ``[-32, 31]``, blocks of 16
  with scale ``fl(d * sc)`` (the super-block's float16 ``d`` times the int8 ``sc``)."""
  blocks = _blocks(raw, shape, K_BLOCK, 210)
  rows = blocks.shape[:-1]
  ql = blocks[..., :128].reshape(rows + (2, 64))  # two halves of 128 values
  qh = blocks[..., 128:192].reshape(rows + (2, 1, 32))
  sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
  low = _low_high(ql).reshape(rows + (2, 4, 32))
  high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3
  codes = (low | (high << 4)).astype(np.int16) - 32
  d = (_f16(blocks[..., 208:210])[..., None] * sc).reshape(shape[:-1] + (-1,))
  return _int8_blocks(codes.reshape(shape), d, Q6_K_GROUP)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Q4_K's eight 6-bit sub-block scales and mins from their 12 bytes (ggml's
  ``get_scale_min_k4``): bytes 0-3 hold scales 0-3 (and the top bits of 4-7),
  4-7 the mins 0-3 (likewise), 8-11 the low 4 bits of scales and mins 4-7."""
  a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
  sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
  mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
  return sc, mn


Q4_K_GROUP = 32
"""Values per Q4_K sub-block."""


def _q4_k(raw: np.ndarray, shape: tuple[int, ...]) -> QArray:
  """``fl(fl(d sc) q) - fl(dmin m)`` per sub-block of 32, 6-bit ``sc`` and ``m``:
  scale ``fl(d sc)``, offset ``-fl(dmin m)`` (negation is exact)."""
  blocks = _blocks(raw, shape, K_BLOCK, 144)
  rows = blocks.shape[:-1]
  sc, mn = _q4_k_scales(blocks[..., 4:16])
  d = _f16(blocks[..., 0:2])[..., None] * sc.astype(np.float32)
  dm = _f16(blocks[..., 2:4])[..., None] * mn.astype(np.float32)
  codes = _low_high(blocks[..., 16:].reshape(rows + (4, 32)))  # chunks: sub-blocks 2c, 2c + 1
  flat = shape[:-1] + (-1,)
  return _offset_int4(codes.reshape(shape), d.reshape(flat), -dm.reshape(flat), Q4_K_GROUP)


# type: (converter, values per block, bytes per block)
_QUANTIZED = {
  "Q8_0": (_q8_0, GGUF_BLOCK, 2 + GGUF_BLOCK),
  "Q4_0": (_q4_0, GGUF_BLOCK, 2 + GGUF_BLOCK // 2),
  "Q4_1": (_q4_1, GGUF_BLOCK, 4 + GGUF_BLOCK // 2),
  "Q5_0": (_q5_0, GGUF_BLOCK, 6 + GGUF_BLOCK // 2),
  "Q4_K": (_q4_k, K_BLOCK, 144),
  "Q6_K": (_q6_k, K_BLOCK, 210),
}
_FLOATS: dict[str, Any] = {"F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_SUPPORTED = ", ".join([*_FLOATS, *_QUANTIZED])


def _tensor(path: str, t: Any) -> tuple[str, Any]:
  """One tensor of the reader as ``(type name, array or QArray)``."""
  try:
    kind = t.tensor_type.name
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    where = f"{path}: tensor {t.name!r}"
    raw = np.asarray(t.data)
  except (ValueError, IndexError, TypeError, OverflowError, AttributeError) as e:
    raise CheckpointError(f"{path}: tensor {getattr(t, 'name', '?')!r}: {e}") from None
  if any(d < 0 for d in shape) or not shape:
    raise CheckpointError(f"{where}: bad shape {shape}")
  if kind in _FLOATS:
    dtype = np.dtype(_FLOATS[kind])
    if raw.nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise CheckpointError(f"{where}: {raw.nbytes} bytes do not hold {kind} of shape {shape}")
    return kind, np.frombuffer(raw.tobytes(), dtype).reshape(shape)
  if kind not in _QUANTIZED:
    raise CheckpointError(
      f"{where}: type {kind} has no exact layout here yet (supported: {_SUPPORTED})"
    )
  convert, block, per_block = _QUANTIZED[kind]
  if shape[-1] % block:
    raise CheckpointError(f"{where}: {kind} rows of {shape[-1]} are not whole blocks of {block}")
  want = int(np.prod(shape, dtype=np.int64)) // block * per_block
  if raw.nbytes != want:
    raise CheckpointError(f"{where}: {raw.nbytes} bytes do not hold {kind} of shape {shape}")
  return kind, convert(raw.reshape(-1).view(np.uint8), shape)


def read_gguf(
  path: str, rename: Callable[[str], tuple[str, ...] | None]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
  """``(params, metadata, types)`` of a GGUF file (see :func:`load_quantized`)."""
  reader = _reader(path)
  metadata = {k: _field_value(v) for k, v in reader.fields.items() if not k.startswith("GGUF.")}
  paths: list[str] = []
  values: list[Any] = []
  types: dict[str, str] = {}
  for t in reader.tensors:
    keys = rename(t.name)
    if keys is None:
      continue
    kind, value = _tensor(path, t)
    if keys[-1] == "kernel":  # a Flax matmul weight: [in, out], GGUF's [out, in] transposed
      if len(value.shape) != 2:
        raise CheckpointError(f"{path}: tensor {t.name!r}: a kernel must be 2-D, got {value.shape}")
      value = qlayout.transpose(value, (1, 0)) if is_qarray(value) else value.T
    types[t.name] = kind
    paths.append("/".join(keys))
    values.append(value)
  try:
    params = tree_paths.nest(paths, values)
  except ValueError as e:  # two tensors renamed onto one path
    raise CheckpointError(f"{path}: {e}") from None
  return params, metadata, types


def _f16_exact(a: Any) -> bool:
  a = np.asarray(a, np.float32)
  return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def _exact_type(qa: QArray) -> str | None:
  """``"Q8_0"`` / ``"Q4_0"`` / ``"Q4_1"`` where that type holds ``qa`` exactly, else ``None``."""
  if qa.block_size != GGUF_BLOCK or qa.input_scale is not None or qa.perm is not None:
    return None
  if not _f16_exact(qa.scale):
    return None
  if qa.offset is not None:  # fl(d q) + m with zero points 0: Q4_1
    if qa.scheme != ASYMMETRIC_INT4 or not _f16_exact(qa.offset):
      return None
    return "Q4_1" if not np.any(np.asarray(qa.zero_point)) else None
  if qa.scheme == PER_BLOCK:
    return "Q8_0"
  if qa.scheme == INT4:
    return "Q4_0"
  if qa.scheme == ASYMMETRIC_INT4 and bool(np.all(np.asarray(qa.zero_point) == Q4_0_ZERO)):
    return "Q4_0"
  return None


def _block_bytes(qa: QArray, kind: str) -> tuple[np.ndarray, tuple[int, ...]]:
  """``qa``'s codes and float16 scales as GGUF blocks, its block axis moved last."""
  axis = qa.axes[0] % qa.ndim
  codes = np.moveaxis(np.asarray(qa.codes(), np.int32), axis, -1)
  if qa.scheme == INT4:  # centred codes: (c + 8 - 8) * d
    codes = codes + Q4_0_ZERO
  shape = codes.shape
  nb = shape[-1] // GGUF_BLOCK

  def f16_bytes(a: Any) -> np.ndarray:
    a = np.moveaxis(np.asarray(a, np.float32), axis, -1).astype(np.float16)
    return a.reshape(shape[:-1] + (nb, 1)).view(np.uint8)

  head = [f16_bytes(qa.scale)] + ([f16_bytes(qa.offset)] if kind == "Q4_1" else [])
  blocks = codes.reshape(shape[:-1] + (nb, GGUF_BLOCK))
  if kind == "Q8_0":
    body = blocks.astype(np.int8).view(np.uint8)
  else:  # the first 16 codes in the low nibbles, the last 16 in the high ones
    half = GGUF_BLOCK // 2
    body = (blocks[..., :half] | (blocks[..., half:] << 4)).astype(np.uint8)
  return np.concatenate([*head, body], axis=-1).reshape(shape[:-1] + (-1,)), shape


def export_gguf(
  path: str | os.PathLike,
  params: Any,
  *,
  arch: str = "llama",
  metadata: Mapping[str, Any] | None = None,
  name_fn: Callable[[str], str] | None = None,
  requantize: bool = False,
  overwrite: bool = False,
) -> dict[str, str]:
  """Writes a param tree as a GGUF file that llama.cpp (and :func:`load_quantized`) reads.

  QArrays that a GGUF type holds exactly are written as they are:
  ``symmetric_per_block_int8`` as Q8_0, ``symmetric_per_group_int4`` and
  ``asymmetric_per_group_int4`` with zero points 8 as Q4_0, when blocks are 32
  values and every scale is a float16 value (so a tree read by
  :func:`load_quantized` comes back byte for byte). The block axis is moved last,
  so a Flax ``[in, out]`` kernel becomes GGUF's ``[out, in]``. Float arrays are
  written as F32, F16 or BF16 (2-D ``kernel`` leaves transposed likewise).

  Args:
    path: the ``.gguf`` file to write (atomically).
    params: a tree of QArrays and float arrays.
    arch: ``general.architecture``.
    metadata: more key-values (ints, floats, strings, bools).
    name_fn: a leaf's tensor name from its path (``"a/b/c"``); default: ``/`` -> ``.``.
    requantize: write other QArrays as Q8_0 made by the ``gguf`` package's own
      quantizer from their dequantized values, blocks along axis 0 (a Flax
      kernel's input axis) moved last (a :class:`RequantizationWarning` names them
      with the added error); otherwise they are refused.
    overwrite: replace an existing GGUF file at ``path``.

  Returns:
    Each tensor's name and written type.

  Raises:
    ValueError: a leaf no GGUF type holds (named, with the reason), or a destination
      that is not a GGUF file (:class:`DestinationError`).
  """
  import gguf

  dest = fileio.check_file_destination(
    os.fspath(path),
    overwrite=overwrite,
    is_ours=lambda p: fileio.file_starts_with(p, b"G", (b"GGUF",), 4),
    kind="GGUF file",
  )
  name_fn = name_fn or (lambda p: p.replace("/", "."))
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
  tensors: list[tuple[str, np.ndarray, Any]] = []
  written: dict[str, str] = {}
  added: dict[str, float] = {}
  types = gguf.GGMLQuantizationType
  for p, x in leaves:
    where = path_str(p)
    name = name_fn(where)
    if is_qarray(x):
      kind = _exact_type(x)
      if kind is not None:
        data, _ = _block_bytes(x, kind)
        tensors.append((name, data, types[kind]))
      elif requantize:
        w = np.asarray(x.dequantize(jnp.float32))
        # Blocks run along the contraction: the block axis, else a Flax kernel's axis 0.
        w = np.moveaxis(w, x.axes[0] % x.ndim if x.block_size is not None else 0, -1)
        if w.shape[-1] % GGUF_BLOCK:
          raise ValueError(f"{where}: {w.shape[-1]} values per row are not whole blocks of 32")
        data = gguf.quants.quantize(np.ascontiguousarray(w), types.Q8_0)
        back = gguf.quants.dequantize(data, types.Q8_0)
        added[where] = float(np.linalg.norm(back - w) / max(np.linalg.norm(w), 1e-30))
        tensors.append((name, data, types.Q8_0))
        kind = "Q8_0"
      else:
        raise ValueError(
          f"{where}: {x.scheme} (block {x.block_size}) is not held exactly by GGUF's Q8_0, "
          "Q4_0 or Q4_1 (blocks of 32 with float16 scales, Q4_0 zero points 8, Q4_1 "
          "zero points 0 and float16 offsets, no input scale); pass requantize=True to "
          "write it as Q8_0"
        )
      written[name] = kind
      continue
    a = np.asarray(x) if hasattr(x, "dtype") else None
    if a is None or a.dtype.name not in ("float32", "float16", "bfloat16"):
      what = a.dtype.name if a is not None else type(x).__name__
      raise ValueError(f"{where}: {what} is not a GGUF tensor type (F32, F16, BF16)")
    if a.ndim == 2 and where.endswith("kernel"):  # a Flax [in, out] kernel: GGUF's [out, in]
      a = np.ascontiguousarray(a.T)
    if a.dtype.name == "bfloat16":
      tensors.append((name, a.view(np.uint16).view(np.uint8), types.BF16))
    else:
      tensors.append((name, a, None))
    written[name] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[a.dtype.name]
  if added:
    warnings.warn(
      "requantized as Q8_0, relative L2 error added: "
      + ", ".join(f"{k} {v:.3g}" for k, v in sorted(added.items())),
      RequantizationWarning,
      stacklevel=2,
    )

  def write_to(tmp: str) -> None:
    w = gguf.GGUFWriter(tmp, arch=arch)
    for key, value in (metadata or {}).items():
      if isinstance(value, bool):
        w.add_bool(key, value)
      elif isinstance(value, int):
        w.add_int64(key, value)
      elif isinstance(value, float):
        w.add_float32(key, value)
      elif isinstance(value, str):
        w.add_string(key, value)
      else:
        raise ValueError(f"metadata {key!r}: {type(value).__name__} is not supported")
    for name, data, raw in tensors:
      w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

  fileio.write_path_atomic(dest, write_to)
  return written
