"""Manifest I/O against the Rust module's own output (fixtures; no Rust needed)."""

import glob
import json
import os
import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sensorquant_jax as sq
from sensorquant_jax import manifest as m
from sensorquant_jax._src import intparse as _intparse
from sensorquant_jax._src.jsonfmt import format_f32, int8_lines
from tests.codecs import use_codec


@pytest.fixture(scope="module", params=["native", "portable"], autouse=True)
def text_codec(request):
  """Every test here runs with the native int8 formatter/parser and the numpy one."""
  with use_codec(request.param) as name:
    yield name


HERE = os.path.dirname(__file__)
GOLDEN = os.path.join(HERE, "fixtures", "golden")
ORACLE = os.path.join(HERE, "fixtures", "oracle")


def _load_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _summary(model: m.QuantizedModel) -> dict:
  """What ``oracle load`` prints, computed the way the oracle computes it."""
  sum_q = sum(int(np.sum(layer.weights_i8, dtype=np.int64)) for layer in model.layers)
  dq = [layer.dequantize().astype(np.float64) for layer in model.layers]
  flat = np.concatenate(dq) if dq else np.zeros(0)
  sum_dq = float(np.cumsum(flat)[-1]) if flat.size else 0.0  # sequential, like Rust's loop
  return {
    "layers": len(model.layers),
    "total_quantized_bytes": model.total_quantized_bytes,
    "total_fp32_bytes": model.total_fp32_bytes,
    "compression_ratio": float(model.compression_ratio()),
    "sum_q": sum_q,
    "sum_dq": sum_dq,
  }


GOOD = [
  "a_seed_test_manifest",
  "b_small_model",
  "c_float_format",
  "d1_nan_weights",
  "d2_all_nan_weights",
]


@pytest.mark.parametrize("case", GOOD)
def test_golden_loads_and_resaves_byte_for_byte(case, tmp_path):
  path = os.path.join(GOLDEN, case, "OUT.json")
  model = m.QuantizedModel.load(path, check_bias=False)
  expect = json.loads(_load_json(os.path.join(GOLDEN, case, "load.json"))["stdout"])
  assert _summary(model) == expect
  model.save(tmp_path / "out.json", check_bias=False)
  assert _read(tmp_path / "out.json") == _read(path)
  assert _read(os.path.join(GOLDEN, case, "RESAVE.json")) == _read(path)


def test_golden_bias_mismatch_is_reported_by_default():
  # b_small_model's "tiny" layer is [1, 6] with 2 bias values; Rust never checks.
  with pytest.raises(m.ManifestError, match=r"layer 3 \('tiny'\): bias has 2 values"):
    m.QuantizedModel.load(os.path.join(GOLDEN, "b_small_model", "OUT.json"))


@pytest.mark.parametrize("case", ["b_small_model", "c_float_format"])
def test_quantize_model_weights_reproduces_rust_bytes(case):
  inp = _load_json(os.path.join(GOLDEN, case, "IN.json"))
  layers = [(x["name"], x["weights"], x["shape"], x["bias"]) for x in inp["layers"]]
  model = m.quantize_model_weights(inp["config_json"], layers)
  assert model.dumps(check_bias=False) == _read(os.path.join(GOLDEN, case, "OUT.json"))


@pytest.mark.parametrize("case", ["d1_nan_weights", "d2_all_nan_weights"])
def test_nan_weights_follow_rust(case):
  w = np.fromfile(os.path.join(GOLDEN, case, "w.f32"), "<f4")
  model = m.quantize_model_weights("{}", [(case, w, [w.size], None)])
  assert model.dumps() == _read(os.path.join(GOLDEN, case, "OUT.json"))


@pytest.mark.parametrize("case,field", [("d3_nan_bias", "bias"), ("d4_inf_weight", "scale")])
def test_rust_null_outputs_are_refused_on_load_and_save(case, field, tmp_path):
  with pytest.raises(m.ManifestError, match=f"layer 0 .*{field}"):
    m.QuantizedModel.load(os.path.join(GOLDEN, case, "OUT.json"))
  w = np.fromfile(os.path.join(GOLDEN, case, "w.f32"), "<f4")
  bias_file = os.path.join(GOLDEN, case, "b.f32")
  b = np.fromfile(bias_file, "<f4") if os.path.exists(bias_file) else None
  model = m.quantize_model_weights("{}", [(case, w, [w.size], b)])
  with pytest.raises(m.ManifestError, match=field):
    model.save(tmp_path / "x.json")
  assert not os.listdir(tmp_path)


def test_seed_manifest_built_by_hand():
  model = m.QuantizedModel(
    "{}",
    [m.QuantizedWeights("l1", np.array([1, -2, 3], np.int8), [1, 3], 0.01, None)],
    "symmetric_per_tensor_int8",
    3,
    12,
  )
  assert model.dumps() == _read(os.path.join(GOLDEN, "a_seed_test_manifest", "OUT.json"))


def test_fp16_matches_rust():
  inp = _load_json(os.path.join(GOLDEN, "e_fp16", "IN.json"))
  out = _load_json(os.path.join(GOLDEN, "e_fp16", "OUT.json"))
  assert m.fp32_to_fp16_bits(inp).tolist() == out["bits"]
  back = m.fp16_bits_to_fp32(out["bits"])
  for got, want in zip(back, out["back"], strict=True):
    assert (not np.isfinite(got)) if want is None else got == np.float32(want)
  nan_bits = m.fp32_to_fp16_bits(np.array([np.nan], np.float32))
  assert nan_bits[0] & 0x7E00 == 0x7E00  # quiet NaN, as half's fallback sets 0x0200
  assert np.isnan(m.fp16_bits_to_fp32(nan_bits))[0]


def test_format_probe_matches_rust_bytes():
  """4,200 random float32 biases and escape-heavy names and config, as Rust wrote them."""
  inp = _load_json(os.path.join(ORACLE, "format_probe", "IN.json"))
  layers = [(x["name"], x["weights"], x["shape"], x["bias"]) for x in inp["layers"]]
  model = m.quantize_model_weights(inp["config_json"], layers)
  expect = _read(os.path.join(ORACLE, "format_probe", "OUT.json"))
  assert model.dumps(check_bias=False) == expect
  loaded = m.QuantizedModel.loads(expect, check_bias=False)
  assert loaded == model


@pytest.mark.parametrize(
  "value,text",
  [
    (0.01, "0.01"),
    (0.5 / 127, "0.003937008"),
    (1e-8, "1e-8"),
    (1.5e-7, "1.5e-7"),
    (123456789.0, "123456790.0"),
    (1e13, "1e13"),
    (1e12, "1000000000000.0"),
    (-0.0, "-0.0"),
    (1e-6, "0.000001"),
    (1e-7, "1e-7"),
    (3.4028235e38, "3.4028235e38"),
    (1e-45, "1e-45"),
    (6.1e-05, "0.000061"),
  ],
)
def test_format_f32_examples(value, text):
  assert format_f32(value) == text


def test_manifests_we_write_load_in_the_oracle():
  """ours_*.json were written by this library and loaded by the Rust oracle."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("mk", os.path.join(ORACLE, "make_fixtures.py"))
  mk = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mk)
  oracle = _load_json(os.path.join(ORACLE, "oracle_loads.json"))
  for name, model in mk.ours_models().items():
    path = os.path.join(ORACLE, name)
    assert model.dumps() == _read(path), name  # we still write the same bytes
    assert _summary(m.QuantizedModel.load(path)) == oracle[name], name


def test_from_f32_matches_the_jax_quantizer():
  data = np.load(os.path.join(ORACLE, "per_tensor_cases.npz"))
  for key in [k for k in data.files if k.endswith("__w")][:40]:
    w = data[key]
    qw = m.QuantizedWeights.from_f32("x", w.reshape(-1), [w.size])
    np.testing.assert_array_equal(qw.weights_i8, data[key[:-3] + "__q"].reshape(-1))
    assert qw.scale.view(np.uint32) == data[key[:-3] + "__scale"].view(np.uint32)


def test_calibrator_and_weight_scale():
  cal = m.Calibrator()
  cal.record_layer("a", [0.5, -2.0, np.nan, 1.0])
  cal.record_layer("empty", [])
  a, empty = cal.finish()
  assert (a.w_min, a.w_max, a.act_min, a.act_max) == (-2.0, 1.0, -1.0, 1.0)
  assert a.weight_scale() == np.float32(np.float32(2.0) / np.float32(127))
  assert empty.w_min == np.inf and empty.w_max == -np.inf
  assert m.LayerCalibration.from_dict(a.to_dict()) == a
  qw = m.QuantizedWeights.from_f32("x", np.ones(8), [2, 4], scale=0.5)
  assert qw.scale == 0.5 and qw.size_bytes() == 8 and qw.compression_ratio() == 4.0
  with pytest.raises(m.ManifestError, match="do not fit shape"):
    m.QuantizedWeights.from_f32("x", np.ones(8), [3, 3])


# ---------------------------------------------------------------------------
# Bridge: pytree <-> manifest.
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# Hostile input.
# ---------------------------------------------------------------------------

VALID = _read(os.path.join(GOLDEN, "a_seed_test_manifest", "OUT.json")).decode()


def _sub(old, new, count=1):
  assert old in VALID, old
  return VALID.replace(old, new, count)


BAD = {
  "empty": "",
  "not json": "hello",
  "truncated": VALID[:-20],
  "truncated in weights": VALID[: VALID.index("-2")],
  "trailing garbage": VALID + "x",
  "second document": VALID + VALID,
  "top-level array": "[" + VALID + "]",
  "NaN literal": _sub('"scale": 0.01', '"scale": NaN'),
  "Infinity literal": _sub('"scale": 0.01', '"scale": Infinity'),
  "scale null": _sub('"scale": 0.01', '"scale": null'),
  "scale zero": _sub('"scale": 0.01', '"scale": 0.0'),
  "scale negative": _sub('"scale": 0.01', '"scale": -0.01'),
  "scale overflow": _sub('"scale": 0.01', '"scale": 1e39'),
  "scale string": _sub('"scale": 0.01', '"scale": "0.01"'),
  "missing scale": _sub('"scale": 0.01,\n', ""),
  "missing layers": _sub('"layers"', '"layerz"'),
  "duplicate key": _sub('"scale": 0.01,', '"scale": 0.01,\n      "scale": 0.01,'),
  "duplicate top key": _sub('"scheme"', '"config_json": "{}",\n  "scheme"'),
  "weight out of range": _sub("-2,", "-128,"),
  "weight 1000": _sub("-2,", "1000,"),
  "weight float": _sub("-2,", "-2.0,"),
  "weight leading zero": _sub("-2,", "-02,"),
  "weight plus": _sub("-2,", "+2,"),
  "weight string": _sub("-2,", '"-2",'),
  "weight nested": _sub("-2,", "[-2],"),
  "weights not array": _sub('"weights_i8": [', '"weights_i8": 5, "x": ['),
  "length vs shape": _sub("        1,\n        3\n", "        1,\n        5\n"),
  "negative shape": _sub("        1,\n        3\n", "        -1,\n        3\n"),
  "shape float": _sub("        1,\n        3\n", "        1.0,\n        3\n"),
  "shape huge": _sub("        1,\n        3\n", "        1,\n        99999999999999999999999\n"),
  "total wrong": _sub('"total_quantized_bytes": 3', '"total_quantized_bytes": 4'),
  "total negative": _sub('"total_fp32_bytes": 12', '"total_fp32_bytes": -12'),
  "bias wrong length": _sub('"bias": null', '"bias": [1.0, 2.0]'),
  "bias with null": _sub('"bias": null', '"bias": [null]'),
  "bias object": _sub('"bias": null', '"bias": {}'),
  "name number": _sub('"name": "l1"', '"name": 7'),
  "control char in string": _sub('"name": "l1"', '"name": "l\x011"'),
  "bad escape": _sub('"name": "l1"', '"name": "l\\x"'),
  "lone surrogate": _sub('"name": "l1"', '"name": "\\ud800"'),
  "invalid utf8": VALID.replace('"l1"', '"l\udcff1"'),
  "deep nesting": _sub('"scheme"', '"junk": ' + "[" * 100000 + "]" * 100000 + ',\n  "scheme"'),
  "unclosed nesting": _sub('"scheme"', '"junk": ' + "[" * 5000 + ',\n  "scheme"'),
  "vertical tab": _sub("-2,", "-2\x0b,"),
  "single quotes": VALID.replace('"name": "l1"', "'name': 'l1'"),
  "memory bomb": _sub("        1,\n        3\n", "        1000000000,\n        1000000000\n"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_inputs_raise_manifest_error(name, tmp_path):
  text = BAD[name]
  path = tmp_path / "bad.json"
  path.write_bytes(text.encode("utf-8", "surrogateescape"))
  tracemalloc.start()
  try:
    with pytest.raises(m.ManifestError):
      m.QuantizedModel.load(path)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 64 * len(text) + (1 << 20), peak


def test_memory_bomb_is_small_and_fast():
  text = json.dumps(
    {
      "config_json": "{}",
      "scheme": "symmetric_per_tensor_int8",
      "layers": [{"name": "x", "weights_i8": [1], "shape": [10**9, 10**9], "scale": 0.1}],
      "total_quantized_bytes": 10**18,
      "total_fp32_bytes": 4 * 10**18,
    }
  )
  assert len(text) < 250
  with pytest.raises(m.ManifestError, match="shape"):
    m.QuantizedModel.loads(text)


def test_missing_file():
  with pytest.raises(m.ManifestError, match="cannot read"):
    m.QuantizedModel.load("/nonexistent/x.json")


def test_unknown_keys_and_missing_bias_are_accepted_like_serde():
  text = _sub('"bias": null\n', '"extra": {"a": [1, 2, {"b": null}]}\n').replace(
    '"scheme"', '"note": "hi",\n  "scheme"'
  )
  model = m.QuantizedModel.loads(text)
  assert model.layers[0].bias is None and model.layers[0].weights_i8.tolist() == [1, -2, 3]


@settings(max_examples=300)
@given(data=st.data())
def test_mutations_never_escape_manifest_error(data):
  """Random byte edits: either a ManifestError, or a valid JSON document we can resave."""
  raw = bytearray(_read(os.path.join(GOLDEN, "b_small_model", "OUT.json")))
  for _ in range(data.draw(st.integers(1, 4))):
    op = data.draw(st.sampled_from(["set", "delete", "insert"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    byte = data.draw(st.sampled_from(list(b'0123456789-+.,[]{}":eE \n\tnul\x00\xff')))
    if op == "set":
      raw[pos] = byte
    elif op == "delete":
      del raw[pos]
    else:
      raw.insert(pos, byte)
  try:
    model = m.QuantizedModel.loads(bytes(raw), check_bias=False)
  except m.ManifestError:
    return
  json.loads(bytes(raw), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
  m.QuantizedModel.loads(model.dumps(check_bias=False), check_bias=False)


@settings(max_examples=150)
@given(
  values=st.lists(st.integers(-127, 127), min_size=0, max_size=300),
  seps=st.lists(st.sampled_from([",", " ,", ", ", ",\n        ", "\t,\r\n"]), min_size=1),
)
def test_int_parser_layouts(values, seps):
  canonical = b"[\n" + b"".join(int8_lines(np.array(values, np.int8), 8)) + b"      ]"
  if not values:
    canonical = b"[]"
  got = _intparse.parse_int8_list(canonical, 1, len(canonical) - 1)
  assert got.tolist() == values
  text = "[" + "".join(f"{v}{seps[i % len(seps)]}" for i, v in enumerate(values))
  text = (text[: -len(seps[(len(values) - 1) % len(seps)])] if values else text) + " ]"
  b = text.encode()
  assert _intparse.parse_int8_list(b, 1, len(b) - 1).tolist() == values


def test_int_parser_large_multichunk_and_bad_tail():
  rng = np.random.default_rng(0)
  q = rng.integers(-127, 128, 300_000).astype(np.int8)
  doc = b"[\n" + b"".join(int8_lines(q, 8)) + b"      ]"
  np.testing.assert_array_equal(_intparse.parse_int8_list(doc, 1, len(doc) - 1), q)
  bad = doc[:-2000] + b"1 2" + doc[-1997:]
  with pytest.raises(_intparse.IntArrayError):
    _intparse.parse_int8_list(bad, 1, len(bad) - 1)


def test_save_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "m.json"
  original = m.QuantizedModel.loads(VALID)
  original.save(path)
  before = _read(path)
  bigger = m.quantize_model_weights("{}", [("a", np.ones(5000), [50, 100], None)])

  def crash(self):
    yield b'{\n  "config_json": "partial'
    raise OSError("disk full")

  monkeypatch.setattr(m.QuantizedModel, "_pieces", crash)
  with pytest.raises(m.ManifestError, match="disk full"):
    bigger.save(path, overwrite=True)
  assert _read(path) == before
  assert sorted(os.listdir(tmp_path)) == ["m.json"]
  monkeypatch.undo()
  with pytest.raises(sq.DestinationError, match="overwrite=True"):
    bigger.save(path)
  bigger.save(path, overwrite=True)
  assert m.QuantizedModel.load(path) == bigger
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as a plain open() would make it


def test_golden_folder_is_complete():
  assert len(glob.glob(os.path.join(GOLDEN, "*", "OUT.json"))) == 8


def test_large_file_loads_and_names_the_error(tmp_path):
  rng = np.random.default_rng(5)
  w = rng.standard_normal(1_600_000).astype(np.float32)
  model = m.quantize_model_weights("{}", [("big", w, [1600, 1000], rng.random(1600))])
  path = tmp_path / "big.json"
  model.save(path, fsync=False)
  assert os.path.getsize(path) > 16 << 20
  assert m.QuantizedModel.load(path) == model
  raw = bytearray(_read(path))
  raw[len(raw) // 2] = ord("x")
  path.write_bytes(bytes(raw))
  with pytest.raises(m.ManifestError, match=f"{re.escape(str(path))}.*weights_i8"):
    m.QuantizedModel.load(path)


@pytest.mark.parametrize("n", [1, 2, 1 << 20, (1 << 20) + 1])
def test_int8_lines_and_parser_across_chunks(n):
  q = np.random.default_rng(n).integers(-127, 128, n).astype(np.int8)
  text = (",\n".join(" " * 8 + str(int(v)) for v in q) + "\n").encode()
  assert b"".join(int8_lines(q, 8)) == text
  doc = b"[\n" + text + b"      ]"
  np.testing.assert_array_equal(_intparse.parse_int8_list(doc, 1, len(doc) - 1), q)
