"""Small Flax models shared by the tests."""

import flax.linen as nn
import jax.numpy as jnp

import sensorquant_jax as sq

MODEL_SCHEMES = tuple(s for s in sq.SCHEMES if s not in (sq.FP8_PER_TENSOR, sq.FP8_PER_CHANNEL))
"""The schemes model-level tests run: every integer scheme and one fp8 scheme. The three
fp8 schemes share their rounding (tests/test_schemes.py checks each bit for bit), and
their layouts are those of per-tensor, per-channel and per-block int8."""


class Block(nn.Module):
  d_model: int = 64
  heads: int = 4
  mlp: int = 128

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln1")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(h, h)
    x = x + h
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.Dense(self.mlp, name="fc1")(h)
    h = nn.gelu(h)
    h = nn.Dense(self.d_model, name="fc2")(h)
    return x + h


class TinyTransformer(nn.Module):
  """Embed + Conv stem + attention blocks (DenseGeneral) + LayerNorm + Dense head."""

  vocab: int = 96
  d_model: int = 64
  depth: int = 2
  classes: int = 10

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
    x = x + nn.Conv(self.d_model, kernel_size=(3,), name="conv")(x)
    for i in range(self.depth):
      x = Block(self.d_model, name=f"blocks_{i}")(x)
    x = nn.LayerNorm(name="ln_f")(x)
    return nn.Dense(self.classes, name="head")(jnp.mean(x, axis=1))


from flax import nnx  # noqa: E402


class NNXBlock(nnx.Module):
  def __init__(self, d, heads, rngs):
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
    self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    h = self.ln1(x)
    x = x + self.attn(h, h)
    return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class NNXTransformer(nnx.Module):
  """The NNX equivalent of TinyTransformer (+ an Einsum layer and a tied attend)."""

  def __init__(self, vocab=96, d=64, depth=2, classes=10, *, rngs):
    self.embed = nnx.Embed(vocab, d, rngs=rngs)
    self.conv = nnx.Conv(d, d, kernel_size=(3,), rngs=rngs)
    self.blocks = nnx.List([NNXBlock(d, 4, rngs) for _ in range(depth)])
    self.mix = nnx.Einsum("btd,dh->bth", (d, d), rngs=rngs)
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, classes, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.conv(x)
    for block in self.blocks:
      x = block(x)
    x = x + self.mix(x)
    x = self.ln_f(x)
    logits = self.embed.attend(x)  # tied output over the vocabulary
    return self.head(jnp.mean(x, axis=1)) + jnp.mean(logits, axis=(1, 2))[:, None]
