"""Pallas kernels (interpret mode on CPU) against the XLA path: every scheme, odd shapes, bias,
float32 and bf16 activations, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax._src import ops, pallas

# The Pallas kernels read integer codes; fp8 kernels run on XLA.
INTEGER = [s for s in sq.SCHEMES if s not in sq.FP8_SCHEMES]
INT8 = [s for s in INTEGER if sq.bits_of(s) == 8]
CASES = [(s, "weight_only") for s in INTEGER] + [(s, "w8a8") for s in INT8]
# N and K are not multiples of any block; rows neither of 16.
SHAPES = {jnp.float32: (5, 300, 200), jnp.bfloat16: (1, 1000, 130)}


# On a GPU, every case in both dtypes (and shapes). In interpret mode on CPU, each
# scheme and mode in one of them, alternating, so that both dtypes meet every mode and
# every scheme family at half the compilations.
KERNEL_CASES = (
  [(s, m, d) for s, m in CASES for d in SHAPES]
  if jax.default_backend() == "gpu"
  else [(s, m, list(SHAPES)[i % 2]) for i, (s, m) in enumerate(CASES)]
)


@pytest.mark.parametrize(
  "scheme,mode,dtype",
  KERNEL_CASES,
  ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_kernels_equal_the_xla_path(scheme, mode, dtype):
  m, k, n = SHAPES[dtype]
  rng = np.random.default_rng(k + n)
  w = rng.standard_normal((k, n)).astype(np.float32) * rng.uniform(0.1, 2, n).astype(np.float32)
  qa = sq.quantize_array(w, scheme, block_size=64 if sq.bits_of(scheme) == 4 else None)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)

  def run(impl):
    return lambda x: sq.dense(x, qa, bias, mode=mode, impl=impl)

  # One compilation covers jit and vmap: a batch of two inputs, each checked.
  xs = jnp.stack([x, -2 * x])
  got = jax.jit(jax.vmap(run("pallas")))(xs)
  assert got.dtype == dtype and got.shape == (2, m, n)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for one, x1 in zip(got, xs, strict=True):
    ref = np.asarray(run("xla")(x1), np.float64)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(one, np.float64), ref, atol=tol * scale, rtol=0)


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_int8_split_k_sums_to_the_same_result(splits):
  rng = np.random.default_rng(splits)
  k, n = 1300, 72
  q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
  s = jnp.asarray(rng.uniform(0.01, 0.02, (1, n)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
  y = pallas.int8_dense(x, q, s, None, block=None, interpret=True, splits=splits)
  ref = (np.asarray(x, np.float64) @ np.asarray(q, np.float64)) * np.asarray(s)
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-4)


def test_w8a8_quantizes_activations_as_the_xla_path():
  # ties at .5 after the division round away from zero, as quantize_activations does
  x = jnp.asarray([[0.5, -0.5, 1.5, -2.5, 127.0, 63.5] + [0.0] * 10], jnp.float32)
  q = jnp.eye(16, 16, dtype=jnp.int8)
  s = jnp.ones((1, 16), jnp.float32)
  for act_scale in (None, 1.0, 0.5):
    got = pallas.w8a8_dense(x, q, s, None, act_scale, block=None, interpret=True)
    xq, xs = ops.quantize_activations(x, act_scale)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(xq, np.float32) * np.asarray(xs))


def test_blocks_must_be_powers_of_two():
  qa = sq.quantize_array(np.ones((96, 32), np.float32), sq.PER_BLOCK, block_size=24)
  with pytest.raises(ValueError, match="power-of-two blocks"):
    sq.dense(jnp.ones((1, 96)), qa, impl="pallas")
