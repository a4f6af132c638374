"""Small Flax models shared by the tests."""

import flax.linen as nn
import jax.numpy as jnp


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
