"""Quantizes a small Flax transformer with every scheme and prints sizes and errors.

An API tour; the main job is ``sensorquant quantize`` (see the README).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

import sensorquant_jax as sq


class Encoder(nn.Module):
  d_model: int = 128
  depth: int = 2

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.d_model, name="patch_embed")(x)
    for i in range(self.depth):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=4, name=f"attn_{i}")(h, h)
      h = nn.LayerNorm()(x)
      x = x + nn.Dense(self.d_model, name=f"mlp_out_{i}")(
        nn.gelu(nn.Dense(4 * self.d_model, name=f"mlp_in_{i}")(h))
      )
    return nn.Dense(6, name="head")(x.mean(axis=1))


def main():
  model = Encoder()
  x = jax.random.normal(jax.random.key(1), (8, 32, 24))
  params = model.init(jax.random.key(0), x)
  ref = model.apply(params, x)
  print(f"float32 params: {sq.nbytes(params) / 1e3:.1f} kB")
  for scheme in sq.SCHEMES:
    qparams = sq.quantize(params, scheme)
    out = jax.jit(lambda q: model.apply(sq.dequantize(q), x))(qparams)
    err = float(jnp.max(jnp.abs(out - ref)))
    agree = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))
    print(
      f"{scheme:30s} {sq.nbytes(qparams) / 1e3:8.1f} kB  max|logit err| {err:.2e}"
      f"  top-1 agreement {agree:.0%}"
    )


if __name__ == "__main__":
  main()
