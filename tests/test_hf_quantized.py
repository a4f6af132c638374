"""Hugging Face quantized checkpoints (GPTQ, AWQ, compressed-tensors, fp8 blocks).

The files are packed here as each format's published code packs them, re-derived in
numpy (the source of each is named above its function), and each reference
dequantizer is that code's dequantization evaluated in float32. Our QArrays must
dequantize to it bit for bit, run ``sq.dense`` on the codes, export back to the same
bytes, and refuse what they cannot hold by name.
"""

import json
import os
import struct

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import sensorquant_jax as sq

rng = np.random.default_rng(11)
K, N, GROUP = 96, 40, 32  # inputs, outputs (Hugging Face weights are [out, in])


# --- GPTQ: AutoGPTQ's QuantLinear.pack (auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py)
# and the torch dequantization of its forward; ``gptq`` (v1) stores zeros - 1.
def gptq_pack(intweight, zeros, bits=4, v1=True):
  """``intweight`` [in, out] and ``zeros`` [groups, out], unsigned codes."""
  per = 32 // bits
  qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), np.uint32)
  i = row = 0
  while row < qweight.shape[0]:
    for j in range(i, i + per):
      qweight[row] |= intweight[j].astype(np.uint32) << (bits * (j - i))
    i += per
    row += 1
  zeros = (zeros - 1 if v1 else zeros).astype(np.uint32)
  qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // per), np.uint32)
  i = col = 0
  while col < qzeros.shape[1]:
    for j in range(i, i + per):
      qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
    i += per
    col += 1
  return qweight.view(np.int32), qzeros.view(np.int32)


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits=4, v1=True):
  wf = np.arange(0, 32, bits, dtype=np.uint32)
  mask = np.uint32((1 << bits) - 1)
  z = (qzeros.view(np.uint32)[:, :, None] >> wf[None, None, :]) & mask
  z = z.reshape(z.shape[0], -1).astype(np.float32) + (1 if v1 else 0)
  w = (qweight.view(np.uint32)[:, None, :] >> wf[None, :, None]) & mask
  w = w.reshape(-1, w.shape[2]).astype(np.float32)
  s = scales.astype(np.float32)
  return s[g_idx] * (w - z[g_idx])  # [in, out]


# --- AWQ: AutoAWQ's WQLinear_GEMM.from_linear packing and
# awq/utils/packing_utils.py dequantize_gemm (unpack, reverse the order, (q - z) * s).
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def awq_pack(intweight):
  packed = np.zeros((intweight.shape[0], intweight.shape[1] // 8), np.uint32)
  for col in range(intweight.shape[1] // 8):
    for i in range(8):
      packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << (i * 4)
  return packed.view(np.int32)


def awq_dequantize(qweight, qzeros, scales, group):
  def unpack(p):
    c = (p.view(np.uint32)[:, :, None] >> np.arange(0, 32, 4, dtype=np.uint32)) & 15
    c = c.reshape(p.shape[0], -1)
    return c.reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(c.shape).astype(np.float32)

  w, z = unpack(qweight), np.repeat(unpack(qzeros), group, axis=0)
  return (w - z) * np.repeat(scales.astype(np.float32), group, axis=0)


# --- compressed-tensors: pack_to_int32 / unpack_from_int32
# (compressed_tensors/compressors/quantized_compressors/pack_quantized.py) and
# quantization/lifecycle/forward.py dequantize: (q - zero_point) * scale per group.
def ct_pack(q, bits=4):
  """Signed codes [rows, cols] -> int32 [rows, ceil(cols / 8)]."""
  value = (q + (1 << (bits - 1))).astype(np.uint32)
  per = 32 // bits
  size = -(-value.shape[1] // per)
  value = np.pad(value, [(0, 0), (0, size * per - value.shape[1])])
  packed = np.zeros((value.shape[0], size), np.uint32)
  for i in range(per):
    packed |= value[:, i::per] << (bits * i)
  return packed.view(np.int32)


def ct_dequantize(q, scale, zero=None, group=GROUP):
  """[out, in] codes, [out, groups] scales (groups of ``group`` inputs, the last one may be
  partial): (q - z) * s in float32, as [in, out]."""
  group = q.shape[1] if scale.shape[1] == 1 else group
  s = np.repeat(scale.astype(np.float32), group, axis=1)[:, : q.shape[1]]
  z = 0 if zero is None else np.repeat(zero.astype(np.float32), group, axis=1)[:, : q.shape[1]]
  return ((q.astype(np.float32) - z) * s).T


def fp8_block_dequantize(w, scale_inv):
  """DeepSeek-V3's weight_dequant: each 128 x 128 tile times its scale, float32, as [in, out]."""
  s = np.repeat(np.repeat(scale_inv, 128, axis=0), 128, axis=1)[: w.shape[0], : w.shape[1]]
  return (w.astype(np.float32) * s).T


def _f16_scales(shape):
  return (rng.uniform(0.5, 2.0, shape) * 2.0 ** rng.integers(-10, -2, shape)).astype(np.float16)


def _gptq_case(v1=True, bits=4, act_order=False):
  top = (1 << bits) - 1
  codes = rng.integers(0, top + 1, (K, N))
  zeros = rng.integers(1 if v1 else 0, top + 1 + (1 if v1 else 0), (K // GROUP, N))
  scales = _f16_scales((K // GROUP, N))
  qweight, qzeros = gptq_pack(codes, zeros, bits=bits, v1=v1)
  g_idx = (np.arange(K) // GROUP).astype(np.int32)
  if act_order:  # GPTQ's desc_act: the inputs quantized in a permuted order, grouped in it
    g_idx[rng.permutation(K)] = np.arange(K, dtype=np.int32) // GROUP
  tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
  ref = gptq_dequantize(qweight, qzeros, scales, g_idx, bits=bits, v1=v1)
  cfg = {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": act_order}
  cfg["checkpoint_format"] = "gptq" if v1 else "gptq_v2"
  return tensors, ref, cfg, (sq.ASYMMETRIC_INT4 if bits == 4 else sq.PER_BLOCK, GROUP)


def _awq_case():
  codes = rng.integers(0, 16, (K, N))
  zeros = rng.integers(0, 16, (K // GROUP, N))
  scales = _f16_scales((K // GROUP, N))
  tensors = {"qweight": awq_pack(codes), "qzeros": awq_pack(zeros), "scales": scales}
  ref = awq_dequantize(tensors["qweight"], tensors["qzeros"], scales, GROUP)
  cfg = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "version": "gemm"}
  return tensors, ref, cfg, (sq.ASYMMETRIC_INT4, GROUP)


def _ct_int4_case(asymmetric, k=K - 5, act_order=False):
  q = rng.integers(-8, 8, (N, k))  # -8 too: compressed-tensors' int4 range is [-8, 7]
  groups = -(-k // GROUP)
  scale = rng.uniform(1e-3, 1e-1, (N, groups)).astype(ml_dtypes.bfloat16)
  tensors = {"weight_packed": ct_pack(q), "weight_scale": scale}
  tensors["weight_shape"] = np.asarray([N, k], np.int64)
  zero = None
  if asymmetric:
    zero = rng.integers(-8, 8, (N, groups)).astype(np.int8)
    tensors["weight_zero_point"] = zero
  scheme = sq.ASYMMETRIC_INT4 if asymmetric else sq.INT4
  if not act_order:
    return tensors, ct_dequantize(q, scale, zero), {}, (scheme, GROUP)
  # act-order: weight_g_idx gives each input's group; (q - z[g_idx]) * s[g_idx]
  g_idx = (np.arange(k) // GROUP).astype(np.int32)[rng.permutation(k)]
  tensors["weight_g_idx"] = g_idx
  s = scale.astype(np.float32)[:, g_idx]
  z = 0 if zero is None else zero.astype(np.float32)[:, g_idx]
  return tensors, ((q.astype(np.float32) - z) * s).T, {}, (scheme, GROUP)


def _ct_int8_case(strategy):
  q = rng.integers(-128, 128, (N, K)).astype(np.int8)
  shape = {"tensor": (1,), "channel": (N, 1), "group": (N, K // GROUP), "asym": (N, 1)}[strategy]
  scale = rng.uniform(1e-3, 1e-1, shape).astype(np.float32)
  tensors = {"weight": q, "weight_scale": scale}
  zero = None
  if strategy == "asym":
    zero = rng.integers(-20, 20, shape).astype(np.int8)
    tensors["weight_zero_point"] = zero
  s2 = np.broadcast_to(scale.reshape(-1, 1) if strategy != "group" else scale, (N, shape[-1]))
  z2 = None if zero is None else np.broadcast_to(zero, (N, 1))
  ref = ct_dequantize(q, np.asarray(s2), z2)
  scheme = {
    "tensor": sq.PER_TENSOR,
    "channel": sq.PER_CHANNEL,
    "group": sq.PER_BLOCK,
    "asym": sq.ASYMMETRIC_PER_CHANNEL,
  }[strategy]
  return tensors, ref, {}, (scheme, GROUP if strategy == "group" else None)


def _fp8_values(shape):
  bits = rng.integers(0, 256, shape, dtype=np.uint8)
  bits[(bits & 0x7F) == 0x7F] = 0x7E  # no NaN (E4M3 has no infinity)
  return bits.view(ml_dtypes.float8_e4m3fn)


def _ct_fp8_case(strategy):
  w = _fp8_values((N, K))
  scale = rng.uniform(1e-3, 1e-1, (N, 1) if strategy == "channel" else (1,)).astype(np.float32)
  ref = ct_dequantize(w, np.broadcast_to(scale.reshape(-1, 1), (N, 1)))
  scheme = sq.FP8_PER_CHANNEL if strategy == "channel" else sq.FP8_PER_TENSOR
  return {"weight": w, "weight_scale": scale}, ref, {}, (scheme, None)


def _fp8_block_case(n=200, k=300):
  w = _fp8_values((n, k))
  scale_inv = rng.uniform(1e-4, 1e-2, (-(-n // 128), -(-k // 128))).astype(np.float32)
  cfg = {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
  tensors = {"weight": w, "weight_scale_inv": scale_inv}
  return tensors, fp8_block_dequantize(w, scale_inv), cfg, (sq.FP8_BLOCK, 128)


CASES = {
  "gptq": lambda: _gptq_case(v1=True),
  "gptq_v2": lambda: _gptq_case(v1=False),
  "gptq_act_order": lambda: _gptq_case(act_order=True),
  "gptq_8bit": lambda: _gptq_case(bits=8),
  "gptq_8bit_act_order_v2": lambda: _gptq_case(v1=False, bits=8, act_order=True),
  "awq": _awq_case,
  "ct_int4_symmetric": lambda: _ct_int4_case(False),
  "ct_int4_asymmetric": lambda: _ct_int4_case(True),
  "ct_int4_act_order": lambda: _ct_int4_case(True, act_order=True),
  "ct_int8_tensor": lambda: _ct_int8_case("tensor"),
  "ct_int8_channel": lambda: _ct_int8_case("channel"),
  "ct_int8_group": lambda: _ct_int8_case("group"),
  "ct_int8_asymmetric": lambda: _ct_int8_case("asym"),
  "ct_fp8_channel": lambda: _ct_fp8_case("channel"),
  "ct_fp8_tensor": lambda: _ct_fp8_case("tensor"),
  "fp8_block": _fp8_block_case,
}
TYPES = {
  "gptq": "gptq int4 g32",
  "gptq_v2": "gptq int4 g32",
  "gptq_act_order": "gptq int4 g32, act-order",
  "gptq_8bit": "gptq int8 g32",
  "gptq_8bit_act_order_v2": "gptq int8 g32, act-order",
  "awq": "awq int4 g32",
  "ct_int4_symmetric": "compressed-tensors int4 g32",
  "ct_int4_asymmetric": "compressed-tensors int4 g32",
  "ct_int4_act_order": "compressed-tensors int4 g32, act-order",
  "ct_int8_tensor": "compressed-tensors int8 tensor",
  "ct_int8_channel": "compressed-tensors int8 channel",
  "ct_int8_group": "compressed-tensors int8 g32",
  "ct_int8_asymmetric": "compressed-tensors int8 channel",
  "ct_fp8_channel": "compressed-tensors fp8 channel",
  "ct_fp8_tensor": "compressed-tensors fp8 tensor",
  "fp8_block": "fp8 block128",
}
FORMATS = {"awq": "awq", "fp8_block": "fp8"}
FORMATS.update({case: "gptq" for case in CASES if case.startswith("gptq")})
PREFIX = "model.layers.0.mlp.up_proj"


def _write(folder, tensors, cfg, prefix=PREFIX, extra=None):
  os.makedirs(folder, exist_ok=True)
  out = {f"{prefix}.{k}": np.ascontiguousarray(v) for k, v in tensors.items()}
  out.update(extra or {})
  save_file(out, os.path.join(folder, "model.safetensors"))
  if cfg:
    with open(os.path.join(folder, "config.json"), "w") as f:
      json.dump({"model_type": "llama", "quantization_config": cfg}, f)
  return folder


@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_is_the_formats_dequantizer_bit_for_bit(case, tmp_path):
  tensors, ref, cfg, (scheme, block) = CASES[case]()
  bias = rng.standard_normal(ref.shape[1]).astype(np.float16)
  norm = rng.standard_normal(8).astype(np.float32)
  extra = {f"{PREFIX}.bias": bias, "model.norm.weight": norm}
  folder = _write(tmp_path / "m", tensors, cfg, extra=extra)
  got = sq.load_quantized(folder)
  assert got.format == FORMATS.get(case, "compressed-tensors")
  assert got.metadata == cfg
  up = got.params["model"]["layers"]["0"]["mlp"]["up_proj"]
  q = up["kernel"]
  assert sq.is_qarray(q) and q.scheme == scheme and q.block_size == block
  assert q.shape == ref.shape and got.types[PREFIX] == TYPES[case]
  assert (q.perm is not None) == ("act_order" in case)  # rows stored grouped, perm their order
  assert (q.offset is not None) == ("8bit" in case)  # 8-bit: (128 - z) s as an offset
  mine = np.asarray(jax.jit(lambda q: q.dequantize(jnp.float32))(q))
  np.testing.assert_array_equal(mine.view(np.uint32), ref.astype(np.float32).view(np.uint32))
  np.testing.assert_array_equal(up["bias"], bias)  # floats as they are, dtype kept
  np.testing.assert_array_equal(got.params["model"]["norm"]["weight"], norm)
  # The op runs on the codes and matches the float matmul.
  x = rng.standard_normal((3, ref.shape[0])).astype(np.float32)
  want = x.astype(np.float64) @ ref.astype(np.float64)
  atol = 1e-5 * float(np.max(np.abs(x) @ np.abs(ref))) + 1e-6
  np.testing.assert_allclose(jax.jit(sq.dense)(x, q), want, rtol=1e-5, atol=atol)

  def fn(p, x):  # a plain function: the matmul found at dot_general runs on the codes
    return x @ p["w"]

  np.testing.assert_allclose(jax.jit(sq.quantized(fn))({"w": q}, x), want, rtol=1e-5, atol=atol)
  assert sq.explain(fn, {"w": q}, x).dequantized == ()
  # Saved and restored whole (offsets and input orders included).
  sq.save(tmp_path / "ck", got.params)
  chex.assert_trees_all_equal(sq.restore(tmp_path / "ck"), got.params)
  # The same file read as a single .safetensors path; without a config beside it the format
  # is read off the tensors (GPTQ defaults to the gptq format: gptq_v2 needs its config).
  if cfg and not case.endswith("v2"):
    os.remove(folder / "config.json")
  again = sq.load_quantized(folder / "model.safetensors")
  chex.assert_trees_all_equal(again.params, got.params)


def test_export_gptq_writes_autogptqs_bytes_and_reads_back(tmp_path):
  """An imported GPTQ layer exported again is the reference packer's bytes; our own
  int4 kernels (float16 scales) round-trip; the rest is refused by name."""
  for case in [c for c in CASES if c.startswith("gptq")]:
    tensors, _, cfg, _ = CASES[case]()
    folder = _write(tmp_path / case, tensors, cfg)
    got = sq.load_quantized(folder)
    out = tmp_path / f"{case}.safetensors"
    written = sq.export_gptq(out, got.params, checkpoint_format=cfg["checkpoint_format"])
    assert {k: written[k] for k in cfg} == cfg
    back = load_file(str(out))
    for k, v in tensors.items():
      np.testing.assert_array_equal(back[f"{PREFIX}.{k}"], v, err_msg=k)
  w = rng.standard_normal((64, 48)).astype(np.float32)
  q = sq.quantize_array(w, sq.ASYMMETRIC_INT4, block_size=32)
  q = q.replace(scale=q.scale.astype(jnp.float16).astype(jnp.float32))
  q = q.replace(zero_point=jnp.maximum(q.zero_point, 1))  # v1 holds zero points 1 to 16
  sym = sq.quantize_array(w, sq.INT4, block_size=32)
  sym = sym.replace(scale=sym.scale.astype(jnp.float16).astype(jnp.float32))
  tree = {"a": {"kernel": q}, "b": {"kernel": sym}, "norm": {"weight": np.ones(4, np.float32)}}
  sq.export_gptq(tmp_path / "ours.safetensors", tree)
  read = sq.load_quantized(tmp_path / "ours.safetensors").params
  chex.assert_trees_all_equal(read["a"]["kernel"].dequantize(), q.dequantize())
  chex.assert_trees_all_equal(read["b"]["kernel"].dequantize(), sym.dequantize())
  chex.assert_trees_all_equal(read["a"]["kernel"].values, q.values)
  np.testing.assert_array_equal(read["norm"]["weight"], np.ones(4, np.float32))
  bad = sq.quantize_array(w, sq.ASYMMETRIC_INT4, block_size=32)  # float32 scales
  with pytest.raises(ValueError, match="a/kernel: GPTQ stores float16 scales"):
    sq.export_gptq(tmp_path / "bad.safetensors", {"a": {"kernel": bad}})
  zero0 = q.replace(zero_point=jnp.zeros_like(q.zero_point))
  with pytest.raises(ValueError, match="a/kernel: zero points 0..0 do not fit the gptq format"):
    sq.export_gptq(tmp_path / "bad.safetensors", {"a": {"kernel": zero0}})
  sq.export_gptq(tmp_path / "v2.safetensors", {"a": {"kernel": zero0}}, checkpoint_format="gptq_v2")
  with pytest.raises(ValueError, match="a/kernel: symmetric_per_channel_int8"):
    sq.export_gptq(
      tmp_path / "bad.safetensors", {"a": {"kernel": sq.quantize_array(w, sq.PER_CHANNEL)}}
    )
  assert not (tmp_path / "bad.safetensors").exists()
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(sq.DestinationError):
    sq.export_gptq(tmp_path / "notes.txt", tree, overwrite=True)
  assert (tmp_path / "notes.txt").read_text() == "mine"


def _hostile(tmp_path):
  tensors, _, cfg, _ = _gptq_case()
  good = _write(tmp_path / "good", tensors, cfg)
  data = (good / "model.safetensors").read_bytes()
  cases = []

  def variant(name, changes, cfg=cfg, pattern="", drop=()):
    t = {k: v for k, v in tensors.items() if k not in drop}
    t.update(changes)
    cases.append((_write(tmp_path / name, t, cfg), pattern))

  uneven = (np.arange(K) // GROUP).astype(np.int32)
  uneven[GROUP] = 0  # 33 inputs in group 0, 31 in group 1
  variant("uneven_groups", {"g_idx": uneven}, pattern="does not put 32 inputs in each")
  variant("bits_mismatch", {}, cfg={**cfg, "bits": 8}, pattern="the config says 8 bits")
  variant("three_bit", {"g_idx": np.zeros(128, np.int32)}, cfg={**cfg, "bits": 3},
          pattern="3-bit GPTQ has no exact layout")  # fmt: skip
  variant("no_zeros", {}, pattern="has no 'qzeros'", drop=("qzeros",))
  variant("nan_scale", {"scales": np.full((K // GROUP, N), np.nan, np.float16)}, pattern="NaN")
  variant("bad_shape", {"scales": tensors["scales"][:, :8]}, pattern="do not fit together")
  variant("float_qweight", {"qweight": tensors["qweight"].astype(np.float32)},
          pattern="qweight is float32, expected int32")  # fmt: skip
  variant("bad_format", {}, cfg={**cfg, "checkpoint_format": "marlin"}, pattern="marlin")
  for name, blob, pattern in [
    ("cut", data[:-7], "bytes|outside|cut short|not a valid"),
    ("header_cut", data[:5], "shorter than its header"),
    ("huge_header", struct.pack("<Q", 1 << 40) + data[8:], "header of"),
    ("not_json", struct.pack("<Q", 4) + b"{{{{" + data[12:], "not a valid"),
  ]:
    (tmp_path / name).mkdir()
    (tmp_path / name / "model.safetensors").write_bytes(blob)
    cases.append((tmp_path / name, pattern))
  (tmp_path / "empty").mkdir()
  cases.append((tmp_path / "empty", "no .safetensors files"))
  (tmp_path / "badcfg").mkdir()
  (tmp_path / "badcfg" / "model.safetensors").write_bytes(data)
  (tmp_path / "badcfg" / "config.json").write_text("{nope")
  cases.append((tmp_path / "badcfg", "config.json: not readable JSON"))
  return cases


def test_malformed_and_hostile_files_end_in_one_error_naming_the_file(tmp_path):
  for folder, pattern in _hostile(tmp_path):
    with pytest.raises(sq.CheckpointError, match=pattern) as e:
      sq.load_quantized(folder)
    message = str(e.value)
    assert str(folder) in message and "\n" not in message, message
    if (
      "model.safetensors" in os.listdir(folder)
      and os.path.getsize(folder / "model.safetensors") > 100
    ):
      if "qzeros" in pattern or "NaN" in pattern or "inputs in each" in pattern:
        assert PREFIX in message, message  # names the layer


def test_two_tensors_renamed_onto_one_path_are_refused(tmp_path):
  tensors, _, cfg, _ = _gptq_case()
  folder = _write(tmp_path / "m", tensors, cfg, extra={"model.norm.weight": np.ones(8, np.float32)})
  with pytest.raises(sq.CheckpointError, match="leaf .same. appears twice") as e:
    sq.load_quantized(folder, rename=lambda n: ("same",))
  assert str(folder) in str(e.value)


def test_hf_flax_names_table():
  assert sq.hf_flax_names("model.embed_tokens.weight") == ("model", "embed_tokens", "embedding")
  assert sq.hf_flax_names("model.layers.3.input_layernorm.weight")[-1] == "weight"
  assert sq.hf_flax_names("model.norm.weight") == ("model", "norm", "weight")
  assert sq.hf_flax_names("lm_head.weight") == ("lm_head", "kernel")
  assert sq.hf_flax_names("model.layers.0.self_attn.q_proj.bias")[-1] == "bias"


def _gptq_quantize(w, group=32):
  """A float [in, out] kernel as GPTQ tensors by round-to-nearest (float16 scales)."""
  k, n = w.shape
  wg = w.reshape(k // group, group, n)
  lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
  scale = np.maximum((hi - lo) / 15, 1e-6).astype(np.float16)
  s = scale.astype(np.float32)
  zero = np.clip(np.round(-lo / s), 1, 15)
  codes = np.clip(np.round(wg / s[:, None] + zero[:, None]), 0, 15).reshape(k, n)
  qweight, qzeros = gptq_pack(codes.astype(np.int64), zero.astype(np.int64))
  return {"qweight": qweight, "qzeros": qzeros, "scales": scale,
          "g_idx": (np.arange(k) // group).astype(np.int32)}  # fmt: skip


def test_a_gptq_llama_checkpoint_runs_greedy_decoding_through_a_flax_llama(tmp_path):
  """A tiny Llama in a GPTQ checkpoint with Hugging Face's names, read with the default
  ``hf_flax_names`` into the Flax Llama's tree: the same greedy tokens as the float model on
  the dequantized weights, every matmul on the quantized ops."""
  from tests import llm_models as M

  cfg = M.LlamaConfig(vocab=96, dim=64, heads=2, hidden=128, layers=2)
  model = M.HFLlama(cfg)
  params = model.init(jax.random.key(5), jnp.zeros((1, 4), jnp.int32))["params"]
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [k.key for k in p]
    x = np.asarray(x, np.float32)
    if keys[-1] == "kernel" and keys[0] == "model":  # the layers' linears: GPTQ
      for suffix, a in _gptq_quantize(x).items():
        out[".".join(keys[:-1]) + "." + suffix] = a
    elif keys[-1] == "kernel":  # lm_head stays float16, [out, in]
      out[".".join(keys[:-1]) + ".weight"] = np.ascontiguousarray(x.T).astype(np.float16)
    else:
      name = ".".join(keys[:-1]) + ".weight"
      out[name] = x
  (tmp_path / "llama").mkdir()
  save_file(out, str(tmp_path / "llama" / "model.safetensors"))
  got = sq.load_quantized(tmp_path / "llama")
  q = got.params
  assert got.format == "gptq"
  assert jax.tree_util.tree_structure(sq.dequantize(q)) == jax.tree_util.tree_structure(params)
  floats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), sq.dequantize(q))
  quantized = jax.jit(lambda p, t: sq.apply(model, {"params": p}, t))
  float_fn = jax.jit(lambda p, t: model.apply({"params": p}, t))

  np.testing.assert_array_equal(M.greedy(quantized, q), M.greedy(float_fn, floats))
  tokens = jnp.asarray([[1, 17, 42, 5]], jnp.int32)
  explained = sq.explain(lambda p, t: model.apply({"params": p}, t), q, tokens)
  assert explained.dequantized == ()


def test_cli_inspects_and_converts_without_requantizing(tmp_path, capsys):
  from sensorquant_jax import cli

  tensors, _, cfg, _ = _gptq_case()
  src = _write(tmp_path / "gptq", tensors, cfg, extra={"model.norm.weight": np.ones(8, np.float32)})
  assert cli.main(["inspect", str(src)]) == 0
  out = capsys.readouterr().out
  assert "gptq" in out and "asymmetric_per_group_int4" in out and "(96, 40)" in out
  # Hugging Face GPTQ -> our checkpoint -> GPTQ again: the same bytes.
  assert cli.main(["convert", str(src), str(tmp_path / "ckpt")]) == 0
  restored = sq.restore(tmp_path / "ckpt")
  chex.assert_trees_all_equal(restored, sq.load_quantized(src).params)
  assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "again.safetensors")]) == 0
  back = load_file(str(tmp_path / "again.safetensors"))
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[f"{PREFIX}.{k}"], v, err_msg=k)
  capsys.readouterr()
  # GGUF holds GPTQ's zero points only by requantizing: refused, then done when asked.
  assert cli.main(["convert", str(src), str(tmp_path / "m.gguf")]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "pass --requantize" in err and "Traceback" not in err
  assert not (tmp_path / "m.gguf").exists()
  assert cli.main(["convert", str(src), str(tmp_path / "m.gguf"), "--requantize"]) == 0
  assert "requantized as Q8_0" in capsys.readouterr().err
  assert sq.load_quantized(tmp_path / "m.gguf").types == {
    "model.layers.0.mlp.up_proj.kernel": "Q8_0",
    "model.norm.weight": "F32",
  }
  # A destination that exists is kept without --overwrite; a broken source is named.
  assert cli.main(["convert", str(src), str(tmp_path / "m.gguf")]) == cli.EXIT_BAD_INPUT
  assert "--overwrite" in capsys.readouterr().err
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00" * 5)
  assert cli.main(["convert", str(tmp_path / "bad"), str(tmp_path / "x")]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert "bad/model.safetensors" in err and err.count("\n") == 1


def test_stacked_act_order_kernels_under_scan_and_vmap(tmp_path):
  """Act-order kernels stacked along a layer axis: ``vmap`` runs the quantized op per
  layer; a scan over them is dequantized (the stacked input order does not map onto
  the scanned op), named in the warning, and still equals the float model."""
  qs = []
  for i in range(2):
    tensors, _, cfg, _ = _gptq_case(act_order=True)
    got = sq.load_quantized(_write(tmp_path / f"m{i}", tensors, cfg))
    qs.append(got.params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"])
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)
  assert stacked.perm.shape == (2, K)
  floats = np.stack([np.asarray(q.dequantize()) for q in qs])
  np.testing.assert_array_equal(np.asarray(stacked.dequantize()), floats)
  x = rng.standard_normal((3, K)).astype(np.float32)
  want = np.einsum("bk,lkn->lbn", x, floats)
  tol = dict(rtol=1e-5, atol=1e-5 * np.abs(want).max())
  got = jax.jit(jax.vmap(lambda q: sq.dense(x, q)))(stacked)
  np.testing.assert_allclose(got, want, **tol)

  def fn(p, x):
    return jax.lax.scan(lambda h, w: (h, h @ w), x, p["w"])[1]

  with pytest.warns(sq.DequantizedWarning, match=": w;"):
    got = jax.jit(sq.quantized(fn))({"w": stacked}, x)
  np.testing.assert_allclose(got, want, **tol)
  assert sq.explain(fn, {"w": stacked}, x).dequantized == ("w",)
