"""One entry point for quantized checkpoints made by other tools: GGUF and Hugging Face formats."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from sensorquant_jax._src import gguf_io, hf_quantized
from sensorquant_jax._src.checkpoint import CheckpointError, file_magic


@dataclasses.dataclass(frozen=True)
class Imported:
  """What :func:`load_quantized` read.

  Attributes:
    params: nested dicts of QArrays and float arrays, keyed by ``rename``.
    format: the file's format: ``"gguf"``, ``"gptq"``, ``"awq"``,
      ``"compressed-tensors"``, ``"fp8"`` (several joined by ``+``), or
      ``"safetensors"`` when no tensor is quantized.
    metadata: GGUF: the file's key-values; safetensors: the model's
      ``quantization_config`` (empty without a ``config.json``).
    types: how each tensor was stored, by its name in the file (GGUF: ``"Q8_0"``,
      ...; safetensors: per quantized layer prefix, e.g. ``"gptq int4 g128"``, and
      per float tensor its dtype).
  """

  params: dict[str, Any]
  format: str
  metadata: dict[str, Any]
  types: dict[str, str]


def load_quantized(
  path: str | os.PathLike,
  *,
  rename: Callable[[str], tuple[str, ...] | None] | None = None,
) -> Imported:
  """Reads a quantized checkpoint made elsewhere into QArrays, without requantizing.

  Supported, each onto the QArray layout that holds it exactly (dequantized
  values equal the format's own dequantizer's float32 values bit for bit):

  - GGUF files (llama.cpp): ``F32``, ``F16``, ``BF16``, ``Q8_0``, ``Q4_0``,
    ``Q4_1``, ``Q5_0``, ``Q4_K``, ``Q6_K`` (see :mod:`~sensorquant_jax._src.gguf_io`);
  - Hugging Face safetensors checkpoints (a file, or a folder of shards with its
    ``config.json``): GPTQ and AWQ 4-bit, compressed-tensors int8 / int4
    ``pack-quantized`` / fp8, fp8 blocks with ``weight_scale_inv`` (see
    :mod:`~sensorquant_jax._src.hf_quantized`).

  Anything else (other GGUF types, act-order GPTQ, 8-bit GPTQ) is refused by
  name. Memory: GGUF is memory-mapped, safetensors read tensor by tensor, each
  copied once; every size is checked against the file first.

  Args:
    path: a ``.gguf`` file, a ``.safetensors`` file, or a folder of them.
    rename: maps a tensor name to its path in the returned tree (a tuple of keys),
      or ``None`` to leave the tensor out. Default: GGUF names split on ``"."``;
      safetensors names by :func:`hf_flax_names` (``q_proj.weight`` ->
      ``q_proj/kernel``). A path ending in ``"kernel"`` gets the 2-D tensor
      transposed to Flax's ``[in, out]``. A quantized safetensors layer is
      placed at ``rename(prefix + ".weight")`` and is always ``[in, out]``;
      :func:`gguf_llama_names` maps llama.cpp's Llama names.

  Returns:
    An :class:`Imported`: the params, the format, the metadata and each tensor's type.

  Raises:
    CheckpointError: the file is missing, of an unknown format, truncated or
      inconsistent, or holds a type that is not supported (the message names the
      file and tensor).

  Example:
    >>> got = sq.load_quantized("model-Q8_0.gguf")
    >>> got.params["blk"]["0"]["attn_q"]["weight"]  # QArray, [out, in], blocks of 32
    >>> got = sq.load_quantized("Llama-3-8B-GPTQ/")  # model/layers/0/.../q_proj/kernel
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    params, fmt, metadata, types = hf_quantized.read_safetensors(
      path, rename=rename or hf_quantized.hf_flax_names
    )
    return Imported(params, fmt, metadata, types)
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such file or folder")
  magic = file_magic(path)
  if magic == b"GGUF":
    params, metadata, types = gguf_io.read_gguf(path, rename or gguf_io.default_rename)
    return Imported(params, "gguf", metadata, types)
  if path.lower().endswith(".safetensors"):
    params, fmt, metadata, types = hf_quantized.read_safetensors(
      path, rename=rename or hf_quantized.hf_flax_names
    )
    return Imported(params, fmt, metadata, types)
  raise CheckpointError(
    f"{path}: not a GGUF or .safetensors file (other formats are not supported yet)"
  )
