"""GGUF import: files written by the gguf package's writer and quantizers, read into QArrays
that dequantize to the gguf package's own dequantizer bit for bit; hostile files refused."""

import os
import struct

import chex
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import sensorquant_jax as sq
from sensorquant_jax._src import native, qlayout

rng = np.random.default_rng(7)
# Rows that are no multiple of anything, a 3-D tensor, outliers and an all-zero block.
FLOATS = {
  "blk.0.attn_q.weight": rng.standard_normal((7, 96)).astype(np.float32),
  "blk.0.ffn_up.weight": (rng.standard_normal((64, 160)) * 3).astype(np.float32),
  "blk.0.stack.weight": rng.standard_normal((2, 5, 64)).astype(np.float32),
}
FLOATS["blk.0.ffn_up.weight"][3, 40] = 250.0
FLOATS["blk.0.ffn_up.weight"][5, :32] = 0.0
TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K, T.F32, T.F16, T.BF16]
EXPORTED = [T.Q8_0, T.Q4_0, T.Q4_1, T.F32, T.F16, T.BF16]  # the types export_gguf writes
# QArray layout of each quantized type: (scheme, block along the last axis)
LAYOUTS = {
  T.Q8_0: (sq.PER_BLOCK, 32),
  T.Q4_0: (sq.ASYMMETRIC_INT4, 32),
  T.Q4_1: (sq.ASYMMETRIC_INT4, 32),  # zero points 0 and a float16 offset per block
  T.Q5_0: (sq.PER_BLOCK, 32),
  T.Q4_K: (sq.ASYMMETRIC_INT4, 32),  # scale fl(d sc), offset -fl(dmin m) per sub-block
  T.Q6_K: (sq.PER_BLOCK, 16),
}


def _f16_bytes(n_blocks):
  d = (rng.standard_normal(n_blocks) * 2.0 ** rng.integers(-12, 4, n_blocks)).astype(np.float16)
  return d.view(np.uint8).reshape(-1, 2)


def _k_blocks(qtype, shape):
  """Random K-quant super-blocks (the gguf package has no K-quant quantizers): every code
  and sub-block scale, float16 ``d`` (and Q4_K's ``dmin``) of both signs and many exponents."""
  n_blocks = int(np.prod(shape)) // 256
  size = {T.Q6_K: 210, T.Q4_K: 144}[qtype]
  blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
  if qtype == T.Q6_K:
    blocks[:, 208:210] = _f16_bytes(n_blocks)
    blocks[0, 192] = 0x80  # sc = -128
  else:
    blocks[:, 0:2], blocks[:, 2:4] = _f16_bytes(n_blocks), _f16_bytes(n_blocks)
  return blocks.reshape(shape[:-1] + (shape[-1] // 256 * size,))


K_SHAPES = {name: x.shape[:-1] + (256 * (1 + i),) for i, (name, x) in enumerate(FLOATS.items())}


def _write(path, tensors, metadata=True):
  """A GGUF file by the gguf package: each float array stored as the given type."""
  w = gguf.GGUFWriter(str(path), arch="llama")
  if metadata:
    w.add_uint32("llama.block_count", 1)
    w.add_string("general.name", "tiny")
  for name, (x, qtype) in tensors.items():
    if qtype == T.F32:
      w.add_tensor(name, x)
    elif qtype == T.F16:
      w.add_tensor(name, x.astype(np.float16))
    elif x.dtype == np.uint8:  # raw blocks
      w.add_tensor(name, x, raw_dtype=qtype)
    else:
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _reference(path):
  """Each tensor dequantized by the gguf package, as float32."""
  r = gguf.GGUFReader(str(path))
  out = {}
  for t in r.tensors:
    if t.tensor_type in (T.F32, T.F16):
      out[t.name] = np.asarray(t.data, np.float32)
    else:
      out[t.name] = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
  return out


def _leaf(tree, name):
  for k in name.split("."):
    tree = tree[k]
  return tree


def _tensors(qtype):
  """Each test tensor as ``qtype`` (K-quants: random raw blocks, rows of 256, 512, 768)."""
  if qtype in (T.Q6_K, T.Q4_K):
    return {n: (_k_blocks(qtype, K_SHAPES[n]), qtype) for n in FLOATS}
  return {n: (x, qtype) for n, x in FLOATS.items()}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_the_gguf_dequantizer_bit_for_bit(qtype, tmp_path):
  path = _write(tmp_path / "m.gguf", _tensors(qtype))
  got = sq.load_quantized(path)
  ref = _reference(path)
  assert got.format == "gguf" and set(got.types.values()) == {qtype.name}
  assert got.metadata["llama.block_count"] == 1 and got.metadata["general.name"] == "tiny"
  for name, want in ref.items():
    x = _leaf(got.params, name)
    if qtype in LAYOUTS:
      assert sq.is_qarray(x)
      scheme, block = LAYOUTS[qtype]
      assert (x.scheme, x.block_size, x.axes, x.shape) == (scheme, block, (-1,), want.shape)
      mine = np.asarray(jax.jit(lambda q: q.dequantize())(x))
    else:
      mine = np.asarray(x).astype(np.float32)
    assert mine.shape == want.shape, name
    np.testing.assert_array_equal(mine.view(np.uint32), want.view(np.uint32), err_msg=name)


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
def test_ops_run_on_the_imported_codes(qtype, tmp_path):
  """A GGUF weight is ``[out, in]``: as a Flax kernel (transposed, which keeps the blocks
  along the contraction) ``sq.dense`` matches the dequantized float matmul, and a plain
  function's ``x @ w.T`` runs on the quantized op."""
  name = "blk.0.ffn_up.weight"
  path = _write(tmp_path / "m.gguf", {name: _tensors(qtype)[name]})
  w = _leaf(sq.load_quantized(path).params, name)
  deq = np.asarray(w.dequantize(), np.float64)
  x = rng.standard_normal((5, w.shape[1])).astype(np.float32)
  kernel = qlayout.transpose(w, (1, 0))
  y = jax.jit(sq.dense)(x, kernel)
  atol = 1e-4
  if qtype in (T.Q4_K, T.Q6_K):  # random raw blocks: scales up to 2^4, float32 sums of large terms
    atol = 1e-5 * float(np.max(np.abs(x) @ np.abs(deq.T)))
  np.testing.assert_allclose(y, x @ deq.T, rtol=1e-5, atol=atol)

  # Every implementation and mode runs on the codes (the offset is added as a float term).
  impls = ["xla"] + (["native"] if jax.default_backend() == "cpu" and native.ffi_targets() else [])
  for impl in impls:
    got = jax.jit(lambda x, k, impl=impl: sq.dense(x, k, impl=impl))(x, kernel)
    np.testing.assert_allclose(got, x @ deq.T, rtol=1e-5, atol=atol, err_msg=impl)
  w8a8 = jax.jit(lambda x, k: sq.dense(x, k, mode="w8a8"))(x, kernel)
  scale = np.max(np.abs(x), axis=1, keepdims=True) / 127  # int8 activations: their rounding
  bound = (0.5 * scale * np.abs(deq).sum(axis=1)[None, :]).astype(np.float64) + atol
  assert np.all(np.abs(np.asarray(w8a8) - x @ deq.T) <= bound)

  def fn(p, x):
    return x @ p["w"].T

  params = {"w": w}
  got = jax.jit(sq.quantized(fn))(params, x)
  np.testing.assert_allclose(got, x @ deq.T, rtol=1e-5, atol=atol)
  assert sq.explain(fn, params, x).dequantized == ()


def test_rename_maps_and_drops_tensors(tmp_path):
  path = _write(tmp_path / "m.gguf", {n: (x, T.Q8_0) for n, x in FLOATS.items()})
  got = sq.load_quantized(
    path, rename=lambda n: None if "stack" in n else ("layers", n.split(".")[2], "kernel")
  )
  assert set(got.params["layers"]) == {"attn_q", "ffn_up"}
  assert "blk.0.stack.weight" not in got.types
  with pytest.raises(sq.CheckpointError, match="leaf .same. appears twice"):
    sq.load_quantized(path, rename=lambda n: ("same",))


def _header_offset_of(data: bytes, name: str) -> int:
  """Where the tensor info of ``name`` continues after its name (n_dims, dims, type, offset)."""
  key = struct.pack("<Q", len(name)) + name.encode()
  return data.index(key) + len(key)


def _hostile_files(tmp_path):
  name = "blk.0.attn_q.weight"
  good = _write(tmp_path / "good.gguf", {name: (FLOATS[name], T.Q8_0)})
  data = good.read_bytes()
  at = _header_offset_of(data, name)
  n_dims = struct.unpack_from("<I", data, at)[0]
  dims_at, type_at = at + 4, at + 4 + 8 * n_dims
  offset_at = type_at + 4

  def patched(fname, pos, fmt, value):
    b = bytearray(data)
    struct.pack_into(fmt, b, pos, value)
    (tmp_path / fname).write_bytes(bytes(b))
    return tmp_path / fname, name

  (tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
  (tmp_path / "header_cut.gguf").write_bytes(data[:40])
  (tmp_path / "data_cut.gguf").write_bytes(data[:-100])
  (tmp_path / "empty.gguf").write_bytes(b"")
  return [
    (tmp_path / "magic.gguf", "not a GGUF or .safetensors file"),
    (tmp_path / "header_cut.gguf", "not a readable GGUF file"),
    (tmp_path / "data_cut.gguf", "tensor 'blk.0.attn_q.weight': shape .* lies past"),
    (tmp_path / "empty.gguf", "not a GGUF or .safetensors file"),
    (tmp_path / "missing.gguf", "no such file"),
    (*patched("huge_dims.gguf", dims_at, "<Q", 2**40), "lies past the file"),
    (*patched("odd_row.gguf", dims_at, "<Q", 33), "not a multiple|not whole blocks"),
    (*patched("bad_offset.gguf", offset_at, "<Q", 2**50), "at offset 1125899906842624 lies past"),
    (*patched("bad_type.gguf", type_at, "<I", 7), "type Q5_1 has no exact layout"),
    (*patched("no_type.gguf", type_at, "<I", 999), "unknown type 999"),
    (*patched("many_dims.gguf", at, "<I", 7), "7 dimensions"),
    (*patched("huge_count.gguf", 8, "<Q", 2**60), "not a readable GGUF file"),
  ]


def test_hostile_files_end_in_one_error_naming_the_file(tmp_path):
  cases = _hostile_files(tmp_path)
  for case in cases:
    path, pattern = case[0], case[-1]
    with pytest.raises(sq.CheckpointError, match=pattern) as e:
      sq.load_quantized(path)
    message = str(e.value)
    assert str(path) in message and "\n" not in message, message
    if len(case) == 3 and "huge_count" not in str(path):  # a tensor's fields: named
      assert f"tensor {case[1]!r}" in message, message
  for path, _ in [(c[0], None) for c in cases if os.path.exists(c[0])]:
    assert os.path.getsize(path) < 10_000  # everything above stayed within the file's size


@pytest.mark.parametrize("qtype", list(LAYOUTS), ids=lambda t: t.name)
def test_imported_trees_save_and_restore(qtype, tmp_path):
  path = _write(tmp_path / "m.gguf", _tensors(qtype))
  got = sq.load_quantized(path).params
  sq.save(tmp_path / "ck", got)
  back = sq.restore(tmp_path / "ck")
  chex.assert_trees_all_equal(back, got)
  # a restored tree with a `like` of the same structure (the abstract restore path)
  chex.assert_trees_all_equal(sq.restore(tmp_path / "ck", like=got), got)


def _tensor_bytes(path):
  r = gguf.GGUFReader(str(path))
  return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


@pytest.mark.parametrize("qtype", EXPORTED, ids=lambda t: t.name)
def test_export_of_an_imported_file_is_byte_for_byte(qtype, tmp_path):
  src = _write(tmp_path / "m.gguf", {n: (x, qtype) for n, x in FLOATS.items()})
  got = sq.load_quantized(src)
  written = sq.export_gguf(tmp_path / "out.gguf", got.params)
  assert written == got.types
  assert _tensor_bytes(tmp_path / "out.gguf") == _tensor_bytes(src)


def test_export_of_our_trees(tmp_path):
  """Exact where Q8_0 / Q4_0 hold the QArray (a Flax [in, out] kernel written as GGUF's
  [out, in], and read back as a kernel); otherwise refused by name, or requantized by
  gguf's own Q8_0 quantizer."""
  w = rng.standard_normal((64, 48)).astype(np.float32)  # Flax [in, out]
  for scheme in (sq.PER_BLOCK, sq.INT4, sq.ASYMMETRIC_INT4):
    qa = sq.quantize_array(w, scheme, block_size=32)  # blocks along the input axis 0
    # float16 scales and zero points 8: what GGUF holds (as imported trees have)
    fitted = qa.replace(scale=qa.scale.astype(jnp.float16).astype(jnp.float32))
    if fitted.zero_point is not None:
      fitted = fitted.replace(zero_point=jnp.full_like(fitted.zero_point, 8))
    out = tmp_path / f"{scheme}.gguf"
    assert sq.export_gguf(out, {"fc": {"kernel": fitted}}) == {
      "fc.kernel": "Q8_0" if scheme == sq.PER_BLOCK else "Q4_0"
    }
    stored = gguf.GGUFReader(str(out)).tensors[0]
    assert tuple(int(d) for d in reversed(stored.shape.tolist())) == (48, 64)  # [out, in]
    back = sq.load_quantized(out).params["fc"]["kernel"]  # a "kernel": back to [in, out]
    assert back.shape == (64, 48) and back.axes == (-2,)
    np.testing.assert_array_equal(back.dequantize(), fitted.dequantize())
    with pytest.raises(ValueError, match="fc/kernel: .*requantize=True"):
      sq.export_gguf(tmp_path / "refused.gguf", {"fc": {"kernel": qa}})
    assert not (tmp_path / "refused.gguf").exists()
  qa = sq.quantize_array(w, sq.PER_CHANNEL)
  with pytest.warns(sq.RequantizationWarning, match="fc/kernel"):
    sq.export_gguf(tmp_path / "req.gguf", {"fc": {"kernel": qa}}, requantize=True)
  data = gguf.GGUFReader(str(tmp_path / "req.gguf")).tensors[0].data
  ref = gguf.quants.quantize(np.ascontiguousarray(np.asarray(qa.dequantize()).T), T.Q8_0)
  assert np.asarray(data).tobytes() == ref.tobytes()  # gguf's own quantizer, as it is
  with pytest.raises(sq.DestinationError, match="overwrite"):
    sq.export_gguf(tmp_path / "req.gguf", {"b": np.zeros(4, np.float32)})
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(sq.DestinationError, match="not a GGUF file"):
    sq.export_gguf(tmp_path / "notes.txt", {"b": np.zeros(4, np.float32)}, overwrite=True)
  assert (tmp_path / "notes.txt").read_text() == "mine"


LLAMA_LAYER_NAMES = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"]
LLAMA_LAYER_NAMES += ["ffn_gate", "ffn_up", "ffn_down"]


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1], ids=lambda t: t.name)
def test_a_llama_gguf_file_runs_greedy_decoding_through_a_flax_llama(qtype, tmp_path):
  """A tiny Llama written by the gguf package with llama.cpp's tensor names, read with
  ``gguf_llama_names`` into Hugging Face's Flax Llama layout: the quantized model
  decodes the same greedy tokens as the float model on the dequantized weights, and
  every matmul runs on the quantized ops."""
  from tests import llm_models as M

  cfg = M.LlamaConfig(vocab=96, dim=64, heads=2, hidden=128, layers=2)
  model = M.HFLlama(cfg)
  params = model.init(jax.random.key(3), jnp.zeros((1, 4), jnp.int32))["params"]
  names = ["token_embd.weight", "output_norm.weight", "output.weight"]
  names += [f"blk.{i}.{n}.weight" for i in range(cfg.layers) for n in LLAMA_LAYER_NAMES]
  tensors = {}
  for name in names:
    keys = sq.gguf_llama_names(name)
    x = params
    for k in keys:
      x = x[k]
    x = np.asarray(x, np.float32)
    x = x.T if keys[-1] == "kernel" else x  # GGUF holds [out, in]
    if keys[-2] in ("q_proj", "k_proj"):  # llama.cpp's convert_hf_to_gguf LlamaModel.permute
      x = x.reshape(cfg.heads, 2, x.shape[0] // cfg.heads // 2, x.shape[1])
      x = x.swapaxes(1, 2).reshape(cfg.dim, cfg.dim)
    tensors[name] = (np.ascontiguousarray(x), T.F32 if x.ndim == 1 else qtype)
  path = _write(tmp_path / "llama.gguf", tensors)
  got = sq.load_quantized(path, rename=sq.gguf_llama_names)
  assert "unmapped" not in got.params
  q = sq.gguf_llama_unpermute(got.params, heads=cfg.heads)
  for p, w in jax.tree_util.tree_flatten_with_path(params)[0]:  # each leaf back in its place
    mine = np.asarray(_leaf_by_keys(sq.dequantize(q), [k.key for k in p]))
    assert np.linalg.norm(mine - w) <= 0.1 * np.linalg.norm(w), sq.path_str(p)
  floats = sq.dequantize(q)
  assert jax.tree_util.tree_structure(floats) == jax.tree_util.tree_structure(params)
  chex_shapes = jax.tree.map(lambda a, b: a.shape == b.shape, floats, params)
  assert all(jax.tree_util.tree_leaves(chex_shapes))
  reference = _reference(path)
  raw = sq.dequantize(got.params)
  for name in names:  # each leaf is the gguf dequantizer's value, in Flax's layout
    keys = sq.gguf_llama_names(name)
    want = reference[name].T if keys[-1] == "kernel" else reference[name]
    np.testing.assert_array_equal(np.asarray(_leaf_by_keys(raw, keys)), want)
    if keys[-2] in ("q_proj", "k_proj"):  # unpermuted: the same values, columns moved
      rows = np.arange(cfg.dim).reshape(cfg.heads, -1, 2).swapaxes(1, 2).reshape(-1)
      np.testing.assert_array_equal(np.asarray(_leaf_by_keys(floats, keys)), want[:, rows])

  quantized = jax.jit(lambda p, t: sq.apply(model, {"params": p}, t))
  float_fn = jax.jit(lambda p, t: model.apply({"params": p}, t))

  np.testing.assert_array_equal(M.greedy(quantized, q), M.greedy(float_fn, floats))
  tokens = jnp.asarray([[1, 17, 42, 5]], jnp.int32)
  assert sq.explain(lambda p, t: model.apply({"params": p}, t), q, tokens).dequantized == ()


def _leaf_by_keys(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def test_cli_inspect_reads_gguf_files(tmp_path, capsys):
  from sensorquant_jax import cli

  name = "blk.0.ffn_up.weight"
  path = _write(tmp_path / "m.gguf", {name: (FLOATS[name], T.Q4_0)})
  assert cli.main(["inspect", str(path)]) == 0
  out = capsys.readouterr().out
  assert "blk/0/ffn_up/weight" in out and "asymmetric_per_group_int4" in out
  (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
  assert cli.main(["inspect", str(tmp_path / "bad.gguf")]) == cli.EXIT_BAD_INPUT
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "bad.gguf" in err and "Traceback" not in err
