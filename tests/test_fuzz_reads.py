"""Seeded fuzzing of everything that reads files: the manifest loader (native and
numpy codecs) and checkpoint restore/read_spec. Only the documented error types,
bounded time and memory, and no touching a file after a failed load."""

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax import checkpoint
from sensorquant_jax import manifest as m
from tests.codecs import CODECS, use_codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS_PER_CASE = 1.0


@pytest.fixture(params=CODECS)
def codec(request):
  with use_codec(request.param) as name:
    yield name


def _run_script(code: str, path) -> str:
  """Runs ``code`` with ``path`` in a fresh interpreter; its stdout (it must exit 0)."""
  proc = subprocess.run(
    [sys.executable, "-c", code, str(path)],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
  return proc.stdout


def _base_manifest() -> bytes:
  rng = np.random.default_rng(0)
  layers = [
    m.QuantizedWeights.from_f32("enc.q", rng.standard_normal(48 * 16), (48, 16), np.ones(48)),
    m.QuantizedWeights.from_f32("emb", rng.standard_normal(30 * 8), (30, 8)),
    m.QuantizedWeights.from_f32("head", rng.standard_normal(3 * 40), (3, 40), np.zeros(3)),
  ]
  total = sum(layer.size_bytes() for layer in layers)
  return m.QuantizedModel('{"d": 1}', layers, m.SCHEME, total, 4 * total).dumps()


_TOKENS = [
  b"{",
  b"}",
  b"[",
  b"]",
  b",",
  b":",
  b'"',
  b"\\",
  b"-",
  b"1e999",
  b"NaN",
  b"Infinity",
  b"null",
  b"true",
  b"\x00",
  b"\xff",
  b"\xed\xa0\x80",
  b'"\\ud800"',
  b"128",
  b"-0",
  b"18446744073709551616",
  b"0.5",
]


def _mutate(base: bytes, rng: random.Random) -> bytes:
  b = bytearray(base)
  kind = rng.randrange(10)
  if kind == 0:  # flip bytes
    for _ in range(rng.randint(1, 8)):
      b[rng.randrange(len(b))] = rng.randrange(256)
  elif kind == 1:  # truncate
    del b[rng.randrange(len(b)) :]
  elif kind == 2:  # insert a token
    i = rng.randrange(len(b))
    b[i:i] = rng.choice(_TOKENS)
  elif kind == 3:  # delete a span
    i = rng.randrange(len(b))
    del b[i : i + rng.randint(1, 40)]
  elif kind == 4:  # duplicate a field
    i = b.find(b'"scale"', rng.randrange(len(b) // 2))
    if i > 0:
      b[i:i] = b'"scale": 1.0, '
  elif kind == 5:  # replace a number by an extreme one
    digits = [i for i, c in enumerate(b) if 48 <= c <= 57]
    i = rng.choice(digits)
    b[i : i + 1] = rng.choice([b"99999999999999999999999", b"1e39", b"1e-46", b"300", b"-128"])
  elif kind == 6:  # huge shape
    i = b.find(b'"shape": [')
    n = rng.choice([65, 1000, 100_000])
    b[i + 10 : b.find(b"]", i)] = b",".join([b"18446744073709551615"] * n)
  elif kind == 7:  # deep nesting in an ignored field
    depth = rng.choice([127, 129, 5000, 200_000])
    b[1:1] = b'"extra": ' + b"[" * depth + b"]" * depth + b","
  elif kind == 8:  # swap two spans
    i, j = sorted(rng.sample(range(len(b)), 2))
    b[i:j] = bytes(reversed(b[i:j]))
  else:  # unknown or missing top-level field
    key = rng.choice([b'"scheme"', b'"layers"', b'"config_json"', b'"name"', b'"weights_i8"'])
    b = bytearray(bytes(b).replace(key, b'"renamed"', 1))
  return bytes(b)


def test_manifest_loader_fuzz(codec, tmp_path):
  base = _base_manifest()
  m.QuantizedModel.loads(base)
  rng = random.Random(20261127)
  path = tmp_path / "f.json"
  outcomes = {"ok": 0, "error": 0}
  worst = 0.0
  for case in range(700):
    data = _mutate(base, rng)
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
      m.QuantizedModel.load(path)
      outcomes["ok"] += 1
    except m.ManifestError as e:
      outcomes["error"] += 1
      assert str(e) and "\n" not in str(e)[:500], (case, str(e)[:300])
    except Exception as e:  # pragma: no cover - the assertion reports it
      pytest.fail(f"case {case}: {type(e).__name__}: {str(e)[:300]}")
    seconds = time.perf_counter() - t0
    if seconds > SECONDS_PER_CASE:  # a shared CI core may stall: time it once more
      t0 = time.perf_counter()
      with contextlib.suppress(m.ManifestError):
        m.QuantizedModel.load(path)
      seconds = min(seconds, time.perf_counter() - t0)
    worst = max(worst, seconds)
  assert outcomes["error"] > 500 and worst < SECONDS_PER_CASE, (outcomes, worst)


_MEASURE = r"""
import json, os, resource, sys, time
import sensorquant_jax.manifest as m
from sensorquant_jax._src import native
path = sys.argv[1]
native.library()  # imports and the native build happen before measuring
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
try:
  m.QuantizedModel.load(path)
  outcome = "ok"
except m.ManifestError as e:
  outcome = "error: " + str(e)[:100]
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"outcome": outcome, "added": peak - base, "seconds": seconds}))
"""


@pytest.mark.parametrize(
  "name",
  ["config_20mb", "config_escaped_10mb", "shape_100k", "deep_1m", "int_list_40mb_bad_tail"],
)
def test_manifest_loader_memory_and_time_bounded(tmp_path, name):
  base = _base_manifest()
  if name == "config_20mb":
    data = base.replace(b'"{\\"d\\": 1}"', b'"' + b"a" * (20 << 20) + b'"')
  elif name == "config_escaped_10mb":
    data = base.replace(b'"{\\"d\\": 1}"', b'"' + b"\\u00e9" * (2 << 20) + b'"')
  elif name == "shape_100k":
    i = base.find(b'"shape": [')
    data = (
      base[: i + 10] + b",".join([b"18446744073709551615"] * 100_000) + base[base.find(b"]", i) :]
    )
  elif name == "deep_1m":
    data = base[:1] + b'"extra": ' + b"[" * 1_000_000 + b"]" * 1_000_000 + b"," + base[1:]
  else:
    n = 40 << 20
    body = b",\n".join([b"        1"] * (n // 11)) + b",\n        999\n      ]"
    data = (
      b'{\n  "config_json": "{}",\n  "layers": [\n    {\n      "name": "x",\n'
      b'      "weights_i8": [\n' + body + b',\n      "shape": [1],\n      "scale": 1.0,\n'
      b'      "bias": null\n    }\n  ],\n  "scheme": "s",\n  "total_quantized_bytes": 1,\n'
      b'  "total_fp32_bytes": 4\n}'
    )
  path = tmp_path / "big.json"
  path.write_bytes(data)
  r = json.loads(_run_script(_MEASURE, path).strip().splitlines()[-1])
  assert r["added"] < 3 * len(data) + (64 << 20), r
  assert r["seconds"] < max(SECONDS_PER_CASE, len(data) / (50 << 20)), r
  if name != "config_20mb" and name != "config_escaped_10mb":
    assert r["outcome"].startswith("error"), r


_SIGBUS = r"""
import sys, time
import sensorquant_jax.manifest as m
path = sys.argv[1]
try:
  m.QuantizedModel.load(path)
except m.ManifestError:
  pass
with open(path, "r+b") as f:  # rewrite the same inode, much shorter
  f.truncate(0)
  f.write(b"{}")
time.sleep(1.0)  # a parser thread still reading the old mapping would fault here
print("survived")
"""


def test_failed_large_load_then_rewrite_does_not_crash(tmp_path):
  # The bad value sits in the first chunk, so that the other chunks are still
  # being parsed when the first one fails (they used to go on reading the map).
  n = 40 << 20
  body = b",\n".join([b"        1"] * (n // 11))
  bad = (
    b'{\n  "config_json": "{}",\n  "layers": [\n    {\n      "name": "x",\n'
    b'      "weights_i8": [\n        x,\n' + body + b"\n      ],\n"
    b'      "shape": [1],\n      "scale": 1.0,\n      "bias": null\n    }\n  ]\n}'
  )
  path = tmp_path / "bad.json"
  path.write_bytes(bad)
  assert "survived" in _run_script(_SIGBUS, path)


# ---------------------------------------------------------------------------
# Checkpoint specs.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  rng = np.random.default_rng(0)
  tree = {
    "blk": sq.quantize_array(
      rng.standard_normal((100, 16)).astype(np.float32), "symmetric_per_block_int8"
    ),
    "asym": sq.quantize_array(
      rng.standard_normal((16, 8)).astype(np.float32), "asymmetric_per_channel_int8"
    ),
    "tensor": sq.quantize_array(rng.standard_normal((4, 4, 4)).astype(np.float32)),
    "bias": rng.standard_normal(8).astype(np.float32),
    "step": 3,
  }
  path = tmp_path_factory.mktemp("fuzz") / "ck"
  sq.save(path, tree)
  return path


_FIELD_VALUES = [
  None,
  "garbage",
  -1,
  0,
  64,
  5,
  1.5,
  True,
  [],
  [5],
  [-1, -1],
  [-9],
  {},
  "float16",
  "int8",
  "bool",
  "complex64",
  "x",
  2**70,
]


def _spec_mutations(doc: dict, rng: random.Random) -> list:
  """Edits of a spec document (JSON text or bytes). Structured edits drop the
  leaf checksum (as a deliberate edit or an older checkpoint would), so the
  field validators see them; byte flips keep it."""
  out = []
  text = json.dumps(doc).encode()
  for _ in range(150):
    b = bytearray(text)
    for _ in range(rng.randint(1, 6)):
      b[rng.randrange(len(b))] = rng.randrange(256)
    out.append(bytes(b))
  doc = dict(doc)
  doc.pop("leaves_sha256")
  leaves = doc["leaves"]
  for i, e in enumerate(leaves):
    for key in list(e) + ["part", "extra"]:
      for v in rng.sample(_FIELD_VALUES, 6):
        d = json.loads(json.dumps(doc))
        d["leaves"][i][key] = v
        out.append(json.dumps(d))
      d = json.loads(json.dumps(doc))
      d["leaves"][i].pop(key, None)
      out.append(json.dumps(d))
  for key in ("format", "parts", "leaves", "metadata"):
    for v in rng.sample(_FIELD_VALUES, 5):
      d = json.loads(json.dumps(doc))
      d[key] = v
      out.append(json.dumps(d))
  d = json.loads(json.dumps(doc))
  d["leaves"].append(dict(d["leaves"][0]))  # duplicated path
  out.append(json.dumps(d))
  d = json.loads(json.dumps(doc))
  d["leaves"][1]["path"] = d["leaves"][0]["path"] + "/inner"  # clashing paths
  out.append(json.dumps(d))
  out.append('{"format": "sensorquant_jax/1", "leaves": ' + "[" * 100_000 + "]" * 100_000 + "}")
  out.append(json.dumps(doc).replace("3", "NaN", 1))
  return out


def test_restore_fuzz(ckpt, tmp_path):
  spec_path = ckpt / "sensorquant.json"
  doc = json.loads(spec_path.read_text())
  good = sq.restore(ckpt)
  rng = random.Random(7)
  work = tmp_path / "ck"
  shutil.copytree(ckpt, work)
  worst, errors, same = 0.0, 0, 0
  mutations = _spec_mutations(doc, rng)
  assert len(mutations) > 300
  for k, text in enumerate(mutations):
    (work / "sensorquant.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    t0 = time.perf_counter()
    try:
      checkpoint.read_spec(work)
      tree = sq.restore(work)
    except checkpoint.CheckpointError as e:
      errors += 1
      assert "leaf_0" not in str(e), str(e)  # user paths, not internal keys
    except Exception as e:  # pragma: no cover - the assertion reports it
      pytest.fail(f"mutation {k}: {type(e).__name__}: {str(e)[:300]}\n{str(text)[:300]}")
    else:
      # Accepted edits (an unknown field, a renamed leaf, metadata) never change a value.
      got, want = _by_path(tree), _by_path(good)
      assert sum(v.ndim > 0 for v in got.values()) == sum(v.ndim > 0 for v in want.values())
      for key in got.keys() & want.keys():
        if want[key].ndim:  # JSON leaves may be edited freely; a dtype edit only rounds
          np.testing.assert_allclose(got[key].astype(np.float32), want[key], rtol=1e-2)
      same += 1
    seconds = time.perf_counter() - t0
    if seconds > SECONDS_PER_CASE:  # a shared CI core may stall: time it once more
      t0 = time.perf_counter()
      with contextlib.suppress(checkpoint.CheckpointError):
        sq.restore(work)
      seconds = min(seconds, time.perf_counter() - t0)
    worst = max(worst, seconds)
  assert errors > 250 and worst < SECONDS_PER_CASE, (errors, same, worst)


def _by_path(tree) -> dict:
  import jax

  leaves = jax.tree_util.tree_flatten_with_path(sq.dequantize(tree))[0]
  return {sq.path_str(p): np.asarray(x) for p, x in leaves}


def test_restore_damaged_array_files_raise_checkpoint_error(ckpt, tmp_path):
  rng = random.Random(3)
  files = []
  for folder, _, names in os.walk(ckpt / "arrays"):
    files += [os.path.relpath(os.path.join(folder, n), ckpt) for n in names]
  assert files
  for k in range(60):
    work = tmp_path / f"ck{k}"
    shutil.copytree(ckpt, work)
    victim = work / rng.choice(files)
    data = bytearray(victim.read_bytes())
    action = rng.randrange(3)
    if action == 0 or not data:
      victim.unlink()
    elif action == 1:
      victim.write_bytes(bytes(data[: rng.randrange(len(data))]))
    else:
      for _ in range(4):
        data[rng.randrange(len(data))] = rng.randrange(256)
      victim.write_bytes(bytes(data))
    try:
      sq.restore(work)
    except checkpoint.CheckpointError as e:
      assert "leaf_0" not in str(e), str(e)
    except Exception as e:  # pragma: no cover
      pytest.fail(f"{victim}: {type(e).__name__}: {str(e)[:300]}")
    shutil.rmtree(work)


def test_parser_workers_have_stopped_when_a_chunk_fails(monkeypatch):
  """Deterministic form of the SIGBUS: when one chunk fails, every chunk already
  handed to a worker has finished before the error reaches the caller (who may
  then close the map and rewrite the file)."""
  from sensorquant_jax._src import intparse as _intparse

  original = _intparse._parse_chunk
  ended: list[float] = []

  def slow(a, final, base):
    try:
      if base > 0:
        time.sleep(0.3)  # the other chunks are still being read when chunk 0 fails
      return original(a, final, base)
    finally:
      ended.append(time.perf_counter())

  monkeypatch.setattr(_intparse, "_parse_chunk", slow)
  n = 4 * _intparse._CHUNK
  body = b"x," + b",".join([b"1"] * (n // 2))
  doc = b"[" + body + b"]"
  with pytest.raises(_intparse.IntArrayError):
    _intparse.parse_int8_list(doc, 1, len(doc) - 1, indent=0)
  raised = time.perf_counter()
  time.sleep(0.5)
  assert len(ended) >= 2 and max(ended) <= raised, "a worker was still reading after the error"
