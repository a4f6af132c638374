"""The native XLA:CPU kernels (csrc/dense.cc) against float references, and their build."""

import ctypes
import dataclasses
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax._src import ffi
from sensorquant_jax._src import native as _native

rng = np.random.default_rng(0)


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


HAVE_COMPILER = _native._compiler() is not None
HAVE_AVX2 = "avx2" in _cpu_flags()  # the W8A8 kernel: VNNI where built, else AVX2
pytestmark = [
  pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler: portable paths only"),
  pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels; GPUs fuse in XLA"),
]


def test_library_builds_and_registers_targets():
  # Where a compiler exists (CI included) the kernels must build: a silent
  # fallback would hide a broken build behind slower but passing tests.
  assert _native.library() is not None, _native.build_error()
  targets = _native.ffi_targets()
  assert _native.WO_TARGET in targets
  assert (_native.W8_TARGET in targets) == HAVE_AVX2
  assert _native.library() is _native.library()  # built once per process


def _ref(x, qa, mode):
  xin = np.asarray(x, np.float64)
  if mode == "w8a8":
    x32 = np.asarray(x, np.float32)
    s = np.maximum(np.max(np.abs(x32), axis=-1, keepdims=True) / np.float32(127), 1e-12)
    y = x32 / s
    xin = np.clip(np.sign(y) * np.floor(np.abs(y) + 0.5), -127, 127) * s
  return xin @ np.asarray(qa.dequantize(), np.float64)


def _layouts(qa):
  yield qa
  if qa.block_size is None:
    for tile in (64, 256, 512):
      if qa.shape[1] % tile == 0 and qa.shape[1] > tile:
        yield sq.pack(qa, tile=tile)


# Shapes reach every code path: row tails of the register blocks (1-7, 13,
# 70), column tails of 64-wide panels (48, 80, 1040 = 16 * 65), K that is not
# a multiple of the 32-row blocks, the 4-row VNNI groups or the 256-row
# float blocks, and wide rows staged a page at a time.
SHAPES = [(1, 1, 16), (2, 3, 48), (3, 33, 80), (4, 70, 1024), (5, 300, 512), (6, 257, 128)]
SHAPES += [(7, 64, 1040), (13, 1000, 256), (70, 96, 192), (1, 4100, 4096)]


# fp8 kernels run on XLA: tests/test_ops.py::test_integer_kernels_refuse_fp8_weights
INT8 = [s for s in sq.SCHEMES if sq.bits_of(s) == 8 and s not in sq.FP8_SCHEMES]


# Every shape in both modes, each with two of the four schemes in turn (every scheme
# meets five shapes, among them each kernel path's edge cases).
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
@pytest.mark.parametrize(
  "scheme,rows,k,n",
  [(INT8[(i + j) % len(INT8)], *shape) for i, shape in enumerate(SHAPES) for j in (0, 1)],
)
def test_native_dense_matches_float_reference(scheme, mode, rows, k, n):
  if mode == "w8a8" and not HAVE_AVX2:
    pytest.skip("the W8A8 kernel needs AVX2")
  w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.1, 2, (1, n))
  x = rng.standard_normal((rows, k)).astype(np.float32)
  qa = sq.quantize_array(w, scheme)
  ref = _ref(x, qa, mode)
  supported = not (mode == "w8a8" and scheme == "symmetric_per_block_int8")
  for kernel in _layouts(qa):
    fn = jax.jit(lambda x, q: sq.dense(x, q, mode=mode, impl="native"))
    if not supported:
      with pytest.raises(RuntimeError, match="unsupported"):
        fn(x, kernel)
      continue
    assert "ffi_call" in str(jax.make_jaxpr(fn)(x, kernel))
    y = np.asarray(fn(x, kernel))
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max() + 1e-6)


def test_native_dense_batch_dims_bf16_and_bias():
  w = rng.standard_normal((96, 64)).astype(np.float32)
  qa = sq.quantize_array(w, "symmetric_per_channel_int8")
  x = rng.standard_normal((2, 3, 96)).astype(np.float32)
  b = rng.standard_normal(64).astype(np.float32)
  ref = np.einsum("btk,kn->btn", x, np.asarray(qa.dequantize())) + b
  y = sq.dense(x, qa, b, impl="native")
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  x16 = x.astype(jnp.bfloat16)
  y16 = sq.dense(x16, qa, b, impl="native")
  assert y16.dtype == jnp.bfloat16
  # Against the bf16 inputs' own float result: only roundings to bf16 (unit
  # roundoff 2^-8: the product, the bias, their sum) separate them, whatever the draw.
  dot16 = np.einsum("btk,kn->btn", np.asarray(x16, np.float32), np.asarray(qa.dequantize()))
  err = np.abs(np.asarray(y16, np.float32) - (dot16 + b))
  assert np.all(err <= 2**-7 * (np.abs(dot16) + np.abs(b)))


def test_native_vmap_folds_rows_and_loops_over_batched_weights():
  qa = sq.quantize_array(rng.standard_normal((64, 128)).astype(np.float32))
  xs = rng.standard_normal((3, 5, 64)).astype(np.float32)
  for mode in ("weight_only", "w8a8") if HAVE_AVX2 else ("weight_only",):
    ys = jax.jit(jax.vmap(lambda x, m=mode: sq.dense(x, qa, mode=m, impl="native")))(xs)
    ref = jax.vmap(lambda x, m=mode: sq.dense(x, qa, mode=m, impl="xla"))(xs)
    np.testing.assert_allclose(ys, ref, rtol=1e-5, atol=1e-5)
  stacked = jax.tree.map(
    lambda *leaves: jnp.stack(leaves), qa, sq.quantize_array(-2 * qa.dequantize())
  )
  yw = jax.vmap(lambda q: sq.dense(xs[0], q, impl="native"))(stacked)
  np.testing.assert_allclose(yw[1], -2 * yw[0], rtol=1e-5, atol=1e-5)


def test_native_gradients_match_xla_path():
  qa = sq.quantize_array(
    rng.standard_normal((64, 128)).astype(np.float32), "asymmetric_per_channel_int8"
  )
  x = rng.standard_normal((5, 64)).astype(np.float32)

  def loss(x, impl):
    return jnp.sum(jnp.tanh(sq.dense(x, qa, impl=impl)))

  g = jax.jit(jax.grad(loss), static_argnums=1)
  gn, gx = g(x, "native"), g(x, "xla")
  # tanh' is evaluated at forward outputs that differ in the last bits.
  np.testing.assert_allclose(gn, gx, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(gx))))
  assert "ffi_call" in str(jax.make_jaxpr(g, static_argnums=1)(x, "native"))


def test_impl_errors():
  qa = sq.quantize_array(rng.standard_normal((32, 50)).astype(np.float32))
  x = np.ones((2, 32), np.float32)
  with pytest.raises(ValueError, match="unknown impl"):
    sq.dense(x, qa, impl="cuda")
  with pytest.raises(RuntimeError, match="unsupported kernel layout"):
    sq.dense(x, qa, impl="native")  # N = 50: not a multiple of 16
  np.testing.assert_allclose(sq.dense(x, qa), x @ np.asarray(qa.dequantize()), rtol=1e-5, atol=1e-5)


def test_pack_defaults_to_native_tile():
  qa = sq.quantize_array(rng.standard_normal((128, 256)).astype(np.float32))
  assert sq.pack(qa).tiles.shape == (4, 128, 64)


def test_disabled_or_unbuildable_native_falls_back(tmp_path):
  code = (
    "import numpy as np, warnings, sensorquant_jax as sq\n"
    "from sensorquant_jax._src import native as _native\n"
    "qa = sq.quantize_array(np.eye(64, dtype=np.float32))\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "  warnings.simplefilter('always')\n"
    "  y = sq.dense(np.ones((2, 64), np.float32), qa)\n"
    "print(_native.library() is None, float(y.sum()), [str(x.message)[:60] for x in w])\n"
  )
  env = dict(os.environ, SENSORQUANT_NATIVE="0")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("True 128.0 []"), out.stdout
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), SENSORQUANT_CACHE=str(tmp_path))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("True 128.0 ['sensorquant_jax native kernels unavailable"), (
    out.stdout
  )


def test_build_cache_is_reused(tmp_path):
  if shutil.which("g++") is None:
    pytest.skip("needs g++")
  env = dict(os.environ, SENSORQUANT_CACHE=str(tmp_path))
  code = "from sensorquant_jax._src import native as _native; print(_native.library()._name)"
  first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
  assert first.stdout == second.stdout
  assert [p.name for p in tmp_path.glob("*.so")] == [os.path.basename(first.stdout.strip())]
  assert "NativeBuildWarning" not in first.stderr  # the build is warning-clean (-Wall -Wextra)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_native_kernels_keep_shardings(packed, mode):
  if mode == "w8a8" and not HAVE_AVX2:
    pytest.skip("the W8A8 kernel needs AVX2")
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("data", "model"))
  w = rng.standard_normal((256, 1024)).astype(np.float32)
  ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
  q = sq.quantize({"k": ws}, "symmetric_per_channel_int8")["k"]
  if packed:
    q = jax.jit(sq.pack)(q)
  x = rng.standard_normal((8, 256)).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
  f = jax.jit(lambda x, q: sq.dense(x, q, mode=mode, impl="native"))
  y = f(xs, q)
  # Rows stay on their devices, columns on theirs; nothing is gathered.
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)
  assert "all-gather" not in f.lower(xs, q).compile().as_text()
  ref = sq.dense(x, jax.device_get(q), mode=mode, impl="xla")
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-4)
  # A sharded contraction axis is gathered, still correctly.
  q2 = sq.quantize({"k": jax.device_put(w, NamedSharding(mesh, P("model", None)))})["k"]
  y2 = f(xs, q2)
  ref2 = sq.dense(x, jax.device_get(q2), mode=mode, impl="xla")
  np.testing.assert_allclose(np.asarray(y2), np.asarray(ref2), rtol=1e-5, atol=1e-4)
  # Rows and columns sharded over the same mesh axis: one of them is gathered.
  x8 = rng.standard_normal((16, 256)).astype(np.float32)
  y3 = f(jax.device_put(x8, NamedSharding(mesh, P("model", None))), q)
  ref3 = sq.dense(x8, jax.device_get(q), mode=mode, impl="xla")
  np.testing.assert_allclose(np.asarray(y3), np.asarray(ref3), rtol=1e-5, atol=1e-4)


def test_kernel_rejects_inconsistent_operands():
  _native.ffi_targets()
  x = jnp.ones((2, 64), jnp.float32)
  w = jnp.ones((64, 32), jnp.int8)
  call = jax.ffi.ffi_call(_native.WO_TARGET, jax.ShapeDtypeStruct((2, 32), jnp.float32))
  with pytest.raises(Exception, match="scale must be"):
    jax.block_until_ready(call(x, w, jnp.ones((1, 16), jnp.float32), block=np.int64(0)))
  with pytest.raises(Exception, match="disagree on K"):
    jax.block_until_ready(call(x[:, :32], w, jnp.ones((1, 32), jnp.float32), block=np.int64(0)))
  with pytest.raises(Exception, match="multiples of 16"):
    w2 = jnp.ones((64, 24), jnp.int8)
    c2 = jax.ffi.ffi_call(_native.WO_TARGET, jax.ShapeDtypeStruct((2, 24), jnp.float32))
    jax.block_until_ready(c2(x, w2, jnp.ones((1, 24), jnp.float32), block=np.int64(0)))


def test_constants_shared_with_the_cpp_kernels():
  """The K limit is defined in csrc/dense.cc and mirrored in Python; they must agree."""
  lib = _native.library()
  if lib is None:
    pytest.skip(f"native library unavailable: {_native.build_error()}")
  lib.SqW8A8MaxK.restype = ctypes.c_int64
  assert lib.SqW8A8MaxK() == ffi.W8_MAX_K
  assert set(_native.ffi_targets()) <= {
    _native.WO_TARGET,
    _native.W8_TARGET,
    _native.INT4_TARGET,
    _native.INT4_ZERO_TARGET,
    _native.W4A8_TARGET,
    _native.INT4_PACKED_TARGET,
  }


def test_failed_build_is_remembered_per_key(tmp_path):
  """A compiler that fails is run once per build key, not once per process."""
  log = tmp_path / "calls"
  fake = tmp_path / "fake-cxx"
  fake.write_text(
    "#!/bin/sh\n"
    'if [ "$1" = "--version" ]; then echo fake 1.0; exit 0; fi\n'
    f"echo compile >> {log}\n"
    "echo 'error: nope' >&2; exit 1\n"
  )
  fake.chmod(0o755)
  env = dict(os.environ, CXX=str(fake), SENSORQUANT_CACHE=str(tmp_path / "cache"))
  code = (
    "import warnings\n"
    "from sensorquant_jax._src import native\n"
    "with warnings.catch_warnings(record=True) as w:\n"
    "  warnings.simplefilter('always')\n"
    "  print(native.library() is None, len(w))\n"
  )
  for _ in range(2):
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "True 1", out.stdout + out.stderr
  assert log.read_text().count("compile") == 1


@pytest.mark.parametrize("scheme", ["symmetric_per_channel_int8", "asymmetric_per_channel_int8"])
@pytest.mark.parametrize(
  ("rows", "k", "n"), [(1, 33, 48), (5, 300, 512), (6, 257, 1040), (17, 130, 80), (70, 64, 208)]
)
def test_w8a8_is_the_integer_reference_bit_for_bit_on_every_path(scheme, rows, k, n):
  """VNNI's vpdpbusd (offset activations, column sums), AVX2's vpmaddubsw (the sign
  moved onto the activations) and, where the machine has them, AMX tiles (rows in
  blocks of 16 and 32, K in steps of 64): the same int32 sums and float steps as
  numpy, on the canonical layout and sq.pack's tiles; asymmetric codes reach -128."""
  from sensorquant_jax._src import ops, packed

  if not HAVE_AVX2:
    pytest.skip("the W8A8 kernel needs AVX2")
  w = rng.standard_normal((k, n)).astype(np.float32)
  w[:, 1] = np.abs(w[:, 1])  # a column whose asymmetric codes start at -128
  qa = sq.quantize_array(w, scheme)
  if qa.zero_point is not None:
    assert int(np.asarray(qa.values).min()) == -128
  x = (rng.standard_normal((rows, k)) * 3).astype(np.float32)
  xq, xs = jax.jit(ops.quantize_activations)(jnp.asarray(x))
  acc = np.asarray(xq, np.int64) @ np.asarray(qa.values, np.int64)
  scale = np.broadcast_to(np.asarray(qa.scale, np.float32), (1, n))
  want = (acc.astype(np.float32) * scale).astype(np.float32) * np.asarray(xs, np.float32)
  isas = [_native.ISA_BEST, _native.ISA_MADD256] + [_native.ISA_AMX] * _native.w8a8_amx()
  for kernel in _layouts(qa):
    m = packed.as_matrix(kernel, 1)
    m = dataclasses.replace(m, zero_point=None)  # the zero point term is added in XLA
    for isa in isas:
      got = np.asarray(jax.jit(lambda a, b, isa=isa, m=m: ops.native_w8a8(a, b, m, isa))(xq, xs))
      np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str(isa))


# --- W4A8: int8 activations x int4 weights on integer dot products -------------


def w4a8_reference(xq, xs, codes, zero, scale, block):
  """The kernel's arithmetic in numpy: exact integer group sums, then float32
  ``y = fl(y + fl(s * float(sum - z * sum(x))))`` group by group, times ``xs``."""
  xq = np.asarray(xq, np.int64)
  k = xq.shape[1]
  y = np.zeros((xq.shape[0], codes.shape[1]), np.float32)
  for g in range(-(-k // block)):
    rows = slice(g * block, min(k, (g + 1) * block))
    acc = xq[:, rows] @ codes[rows].astype(np.int64) - xq[:, rows].sum(1, keepdims=True) * zero[g]
    y = (y + (acc.astype(np.float32) * scale[g]).astype(np.float32)).astype(np.float32)
  return (y * np.asarray(xs, np.float32)).astype(np.float32)


W4A8_ISAS = sorted(_native.w4a8_isas()) if HAVE_COMPILER else []


@pytest.mark.parametrize("scheme", sq.INT4_SCHEMES)
@pytest.mark.parametrize(("k", "n", "block"), [(200, 128, 32), (201, 64, 4), (256, 192, 128)])
def test_w4a8_is_the_integer_reference_bit_for_bit_on_every_isa(scheme, k, n, block):
  """Odd K, a partial last group, every instruction path this machine has (VNNI's
  vpdpbusd, vpmaddubsw on 512 and 256 bits): the same bits as numpy's integer sums
  and float32 epilogue."""
  from sensorquant_jax._src import nibbles, ops, packed

  if not W4A8_ISAS:
    pytest.skip("no W4A8 kernel in this build (it needs AVX2)")
  w = rng.standard_normal((k, n)).astype(np.float32)
  w[:, 3] = np.abs(w[:, 3])  # one column without a negative weight
  q = sq.quantize_array(w, scheme, block_size=block)
  m = packed.as_matrix(q, 1)
  x = (rng.standard_normal((5, k)) * 3).astype(np.float32)
  xq, xs = jax.jit(ops.quantize_activations)(jnp.asarray(x))
  codes = np.asarray(nibbles.unpack(q.values, 0, k), np.int64)
  zero = np.full(np.shape(q.scale), 8) if q.zero_point is None else np.asarray(q.zero_point)
  want = w4a8_reference(xq, xs, codes, zero, np.asarray(q.scale), block)
  outs = {}
  for isa in W4A8_ISAS:
    if not ops.w4a8_ok(m, isa):
      continue
    outs[isa] = np.asarray(jax.jit(lambda a, b, isa=isa: ops.native_w4a8(a, b, m, isa))(xq, xs))
    np.testing.assert_array_equal(outs[isa].view(np.uint32), want.view(np.uint32), err_msg=isa)
  assert outs, "no instruction path ran"
  # The public op picks it (or XLA's int32 path) and agrees to rounding.
  y = jax.jit(lambda x, q: sq.dense(x, q, mode="w8a8"))(x, q)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # sq.pack's int4 tiles (groups a multiple of 8): the same bits on every path.
  if block % 8 == 0 and packed.int4_pack_here():
    pm = packed.as_matrix(sq.pack(q), 1)
    assert pm is not None and pm.tiled
    for isa in W4A8_ISAS:
      got = np.asarray(jax.jit(lambda a, b, isa=isa: ops.native_w4a8(a, b, pm, isa))(xq, xs))
      np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=isa)


@pytest.mark.parametrize("scheme", sq.INT4_SCHEMES)
@pytest.mark.parametrize(("rows", "k", "block"), [(5, 200, 64), (17, 256, 128), (40, 330, 64)])
def test_w4a8_amx_on_packed_tiles_is_the_integer_reference_bit_for_bit(scheme, rows, k, block):
  """AMX tiles (tdpbsud) on sq.pack's int4 tiles: rows in blocks of 16 and 32, a
  partial last group, asymmetric zero points: the bits of numpy's integer sums and
  float32 epilogue, as every other path; the dispatcher offers it where it runs."""
  from sensorquant_jax._src import nibbles, ops, packed

  _needs_packed_int4()
  n = 192
  w = rng.standard_normal((k, n)).astype(np.float32)
  q = sq.quantize_array(w, scheme, block_size=block)
  pm = packed.as_matrix(sq.pack(q), 1)
  if not ops.w4a8_amx_ok(pm):
    pytest.skip("no AMX tiles on this machine")
  x = (rng.standard_normal((rows, k)) * 3).astype(np.float32)
  xq, xs = jax.jit(ops.quantize_activations)(jnp.asarray(x))
  codes = np.asarray(nibbles.unpack(q.values, 0, k), np.int64)
  zero = np.full(np.shape(q.scale), 8) if q.zero_point is None else np.asarray(q.zero_point)
  want = w4a8_reference(xq, xs, codes, zero, np.asarray(q.scale), block)
  amx = _native.ISA_AMX
  got = np.asarray(jax.jit(lambda a, b: ops.native_w4a8(a, b, pm, amx))(xq, xs))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  # The shipped fallback from W4A8_AMX_MIN_ROWS rows; the VNNI kernel's below.
  assert next(iter(ops._w8a8_candidates(pm, k, ops.W4A8_AMX_MIN_ROWS))) == "native_amx"
  assert list(ops._w8a8_candidates(pm, k, 1))[:2] == ["native", "native_amx"]
  # Canonical nibbles are not tiles: the AMX path refuses them with the reason.
  with pytest.raises(Exception, match="packed int4 tiles"):
    jax.jit(lambda a, b: ops.native_w4a8(a, b, packed.as_matrix(q, 1), amx))(xq, xs)


def test_w4a8_under_vmap_and_shardings_and_its_fallbacks():
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from sensorquant_jax._src import ops, packed

  k, n = 256, 512
  w = rng.standard_normal((k, n)).astype(np.float32)
  q = sq.quantize_array(w, sq.ASYMMETRIC_INT4, block_size=64)
  if not ops.w4a8_ok(packed.as_matrix(q, 1)):
    pytest.skip("no W4A8 kernel in this build")
  x = rng.standard_normal((3, 4, k)).astype(np.float32)
  f = jax.jit(lambda x, q: sq.dense(x, q, mode="w8a8", impl="native"))
  ref = jax.jit(lambda x, q: sq.dense(x, q, mode="w8a8", impl="xla"))
  tol = dict(rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(f(x, q), ref(x, q), **tol)
  np.testing.assert_allclose(jax.vmap(f, (0, None))(x, q), ref(x, q), **tol)
  mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("data", "model"))
  qs = jax.device_put(q, NamedSharding(mesh, P(None, "model")))
  xs = jax.device_put(x[0], NamedSharding(mesh, P(None, None)))
  y = f(xs, qs)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
  assert "all-gather" not in f.lower(xs, qs).compile().as_text()
  np.testing.assert_allclose(y, ref(x[0], q), **tol)
  # Kernels it does not take: impl="native" says so, "auto" runs XLA's int32 path.
  odd = sq.quantize_array(w[:, :40], sq.INT4, block_size=64)
  with pytest.raises(RuntimeError, match="unsupported kernel"):
    sq.dense(x[0], odd, mode="w8a8", impl="native")
  want = np.asarray(ref(x[0], odd))
  got = sq.dense(x[0], odd, mode="w8a8")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_w4a8_many_rows_pass_over_the_weights_in_blocks():
  """More rows than one pass holds (256): the same bits as the reference."""
  from sensorquant_jax._src import nibbles, ops, packed

  if not W4A8_ISAS:
    pytest.skip("no W4A8 kernel in this build (it needs AVX2)")
  k, n = 128, 64
  q = sq.quantize_array(rng.standard_normal((k, n)).astype(np.float32), sq.INT4, block_size=32)
  m = packed.as_matrix(q, 1)
  x = rng.standard_normal((300, k)).astype(np.float32)
  xq, xs = jax.jit(ops.quantize_activations)(jnp.asarray(x))
  codes = np.asarray(nibbles.unpack(q.values, 0, k), np.int64)
  want = w4a8_reference(xq, xs, codes, np.full(q.scale.shape, 8), np.asarray(q.scale), 32)
  got = np.asarray(jax.jit(lambda a, b: ops.native_w4a8(a, b, m))(xq, xs))
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# --- Packed int4 tiles (sq.pack on int4 kernels) ---------------------------------


def int4_tiles_reference(codes: np.ndarray) -> np.ndarray:
  """The documented layout, byte by byte: in 64-column tile t, the 256 bytes of each
  8 k hold 4 lines of 16 columns, byte 4 i + j of line q: column 16 q + i at
  k = 8 k8 + j (low nibble) and k = 8 k8 + 4 + j (high nibble); rows past K are 0."""
  k, n = codes.shape
  kp = -(-k // 8) * 8
  c = np.zeros((kp, n), np.uint8)
  c[:k] = codes
  out = np.zeros((n // 64, kp // 2, 64), np.uint8)
  for t in range(n // 64):
    for k8 in range(kp // 8):
      for q in range(4):
        for i in range(16):
          for j in range(4):
            col = 64 * t + 16 * q + i
            lo, hi = c[8 * k8 + j, col], c[8 * k8 + 4 + j, col]
            out[t, 4 * k8 + q, 4 * i + j] = lo | (hi << 4)
  return out


def _needs_packed_int4():
  from sensorquant_jax._src import packed

  if not packed.int4_pack_here():
    pytest.skip("no packed int4 kernel in this build (it needs AVX2 and FMA)")


@pytest.mark.parametrize("scheme", sq.INT4_SCHEMES)
@pytest.mark.parametrize(("k", "n", "block"), [(64, 64, 32), (77, 128, 8), (130, 192, 64)])
def test_int4_tiles_follow_the_documented_layout_and_round_trip(scheme, k, n, block):
  """Odd K and K not a multiple of 8 included: the tiles are the layout's bytes, and
  unpack gives back the canonical QArray exactly (its padding nibble too)."""
  from sensorquant_jax._src import nibbles

  _needs_packed_int4()
  q = sq.quantize_array(rng.standard_normal((k, n)).astype(np.float32), scheme, block_size=block)
  p = sq.pack({"w": q})["w"]
  assert isinstance(p, sq.PackedQArray) and p.bits == 4 and p.shape == (k, n)
  codes = np.asarray(nibbles.unpack(q.values, 0, 2 * q.values.shape[0]))
  np.testing.assert_array_equal(np.asarray(p.tiles), int4_tiles_reference(codes))
  back = sq.unpack(p)
  chex.assert_trees_all_equal(back, q)
  assert sq.nbytes(p) <= sq.nbytes(q) + n * 4  # at most 7 rows of padding codes
  # Kernels the layout cannot hold stay as they are.
  for odd in (
    sq.quantize_array(rng.standard_normal((k, 48)).astype(np.float32), scheme, block_size=8),
    sq.quantize_array(rng.standard_normal((k, n)).astype(np.float32), scheme, block_size=4),
  ):
    assert sq.pack(odd) is odd


@pytest.mark.parametrize("scheme", sq.INT4_SCHEMES)
@pytest.mark.parametrize(("rows", "k", "block"), [(1, 256, 128), (4, 100, 32), (13, 72, 8)])
def test_int4_packed_weight_only_matches_float_and_is_the_same_on_both_widths(
  scheme, rows, k, block
):
  """The packed weight-only kernel against the float matmul on the dequantized kernel;
  its AVX-512 and 256-bit paths give the same bits (same sums in the same order)."""
  from sensorquant_jax._src import ops, packed

  _needs_packed_int4()
  n = 192
  q = sq.quantize_array(rng.standard_normal((k, n)).astype(np.float32), scheme, block_size=block)
  p = sq.pack(q)
  x = rng.standard_normal((rows, k)).astype(np.float32)
  want = x.astype(np.float64) @ np.asarray(q.dequantize(jnp.float32), np.float64)
  m = packed.as_matrix(p, 1)
  outs = [
    np.asarray(jax.jit(lambda x, isa=isa: ops.native_int4_packed(x, m, isa))(x))
    for isa in (_native.ISA_BEST, _native.ISA_MADD256)
  ]
  np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
  np.testing.assert_allclose(outs[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  for impl in ("auto", "native", "xla"):
    y = jax.jit(lambda x, p, impl=impl: sq.dense(x, p, impl=impl))(x, p)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=impl)
  yw = sq.dense(x, p, mode="w8a8", impl="xla")  # XLA's int32 path untiles them
  np.testing.assert_array_equal(np.asarray(yw), np.asarray(sq.dense(x, q, mode="w8a8", impl="xla")))


def test_int4_packed_under_vmap_shardings_and_grad():
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  _needs_packed_int4()
  k, n = 256, 512
  q = sq.quantize_array(
    rng.standard_normal((k, n)).astype(np.float32), sq.ASYMMETRIC_INT4, block_size=64
  )
  p = sq.pack(q)
  x = rng.standard_normal((3, 4, k)).astype(np.float32)
  tol = dict(rtol=1e-5, atol=1e-4)
  for mode in ("weight_only", "w8a8"):
    f = jax.jit(lambda x, q, mode=mode: sq.dense(x, q, mode=mode, impl="native"))
    ref = jax.jit(lambda x, q, mode=mode: sq.dense(x, q, mode=mode, impl="xla"))
    np.testing.assert_allclose(f(x, p), ref(x, q), **tol)
    np.testing.assert_allclose(jax.vmap(f, (0, None))(x, p), ref(x, q), **tol)
    mesh = Mesh(np.array(jax.devices("cpu")[:8]).reshape(2, 4), ("data", "model"))
    cols = NamedSharding(mesh, P(None, "model"))
    ps = sq.PackedQArray(
      jax.device_put(p.tiles, NamedSharding(mesh, P("model", None, None))),
      jax.device_put(p.scale, cols),
      jax.device_put(p.zero_point, cols),
      p.scheme,
      p.axes,
      p.dtype,
      p.block_size,
      p.k,
    )
    y = f(x[0], ps)
    assert y.sharding.is_equivalent_to(cols, 2)
    assert "all-gather" not in f.lower(x[0], ps).compile().as_text()
    np.testing.assert_allclose(y, ref(x[0], q), **tol)
  # Gradients with respect to the activations run through the XLA formula.
  g = jax.grad(lambda x: sq.dense(x, p, impl="native").sum())(x[0])
  gr = jax.grad(lambda x: sq.dense(x, q, impl="xla").sum())(x[0])
  np.testing.assert_allclose(g, gr, rtol=1e-5, atol=1e-5)
