"""Small LLM-style models written the ways real JAX model code is, for the op-level tests.

Gemma-style Linen modules (an ``Einsum`` layer holding ``(N, D, H)`` and
``(2, F, D)`` kernels, an embedder used for lookup and as the tied output
layer), the same stack under ``nn.scan`` and ``nn.remat``, and a plain
function of a param dict with stacked layers under ``lax.scan``. Kernels are
at least 128 wide along every contracted axis, so int4 groups of 128 fit.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 384
  embed: int = 256
  heads: int = 2
  kv_heads: int = 1
  head_dim: int = 128
  hidden: int = 512
  layers: int = 2
  fq: bool = False  # test reference only: fake-quantize every weight matmul's input per token


def fake_quant_tokens(x: jax.Array, n_axes: int = 1) -> jax.Array:
  """Per-token symmetric int8 fake quantization over the last ``n_axes`` axes."""
  axes = tuple(range(x.ndim - n_axes, x.ndim))
  s = jnp.maximum(jnp.max(jnp.abs(x), axis=axes, keepdims=True) / 127.0, 1e-12)
  return jnp.clip(lax.round(x / s, lax.RoundingMethod.AWAY_FROM_ZERO), -127, 127) * s


class Einsum(nn.Module):
  """Gemma's layer: one kernel, the equation given at call time."""

  shape: tuple[int, ...]
  fq: bool = False

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param("w", nn.initializers.normal(0.05), self.shape)
    if self.fq:  # the contracted axes are the input's last ones in every equation here
      ins, out = eqn.replace("...", "").split("->")
      xs, ws = ins.split(",")
      x = fake_quant_tokens(x, sum(1 for a in xs if a in ws and a not in out))
    return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * lax.rsqrt(var + 1e-6) * (1 + scale)


class Attention(nn.Module):
  cfg: Config

  def setup(self):
    c = self.cfg
    self.q_einsum = Einsum((c.heads, c.embed, c.head_dim), c.fq)
    self.kv_einsum = Einsum((2, c.kv_heads, c.embed, c.head_dim), c.fq)
    self.attn_vec_einsum = Einsum((c.heads, c.head_dim, c.embed), c.fq)

  def __call__(self, x):
    c = self.cfg
    q = self.q_einsum("BTD,NDH->BTNH", x)
    k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
    q = q.reshape(q.shape[:2] + (c.kv_heads, c.heads // c.kv_heads, c.head_dim))
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k) * c.head_dim**-0.5
    t = x.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, :, None, None, :]
    probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)
    enc = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(q.shape[:2] + (c.heads, c.head_dim))
    return self.attn_vec_einsum("BTNH,NHD->BTD", enc)


class FeedForward(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    gate = Einsum((2, c.hidden, c.embed), c.fq, name="gating_einsum")("...F,NHF->...NH", x)
    h = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    return Einsum((c.hidden, c.embed), c.fq, name="linear")("...H,HF->...F", h)


class Block(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.cfg, name="attn")(RMSNorm(name="pre_attention_norm")(x))
    return x + FeedForward(self.cfg, name="mlp")(RMSNorm(name="pre_ffw_norm")(x))


class ScanBlock(nn.Module):
  cfg: Config

  @nn.compact
  def __call__(self, x, _):
    return Block(self.cfg, name="block")(x), None


class Embedder(nn.Module):
  cfg: Config

  def setup(self):
    self.input_embedding = self.param(
      "input_embedding", nn.initializers.normal(1.0), (self.cfg.vocab, self.cfg.embed)
    )

  def encode(self, tokens):
    return self.input_embedding[(tokens,)] * jnp.sqrt(self.cfg.embed).astype(jnp.float32)

  def decode(self, x):
    x = fake_quant_tokens(x) if self.cfg.fq else x
    return jnp.dot(x, self.input_embedding.T)


class Transformer(nn.Module):
  """Gemma-style decoder; ``style``: ``"loop"``, ``"scan"`` (``nn.scan``) or ``"remat"``."""

  cfg: Config = Config()
  style: str = "loop"

  @nn.compact
  def __call__(self, tokens, *, return_logits: bool = True, last_only: bool = False):
    emb = Embedder(self.cfg, name="embedder")
    x = emb.encode(tokens)
    if self.style == "scan":
      stack = nn.scan(
        ScanBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.cfg.layers,
      )(self.cfg, name="layers")
      x, _ = stack(x, None)
    else:
      kind = nn.remat(Block) if self.style == "remat" else Block
      for i in range(self.cfg.layers):
        x = kind(self.cfg, name=f"layer_{i}")(x)
    x = RMSNorm(name="final_norm")(x)
    if last_only:  # a Python flag: must stay static
      x = x[:, -1:]
    return emb.decode(x) if return_logits else x


def init_plain(cfg: Config, key: jax.Array) -> dict:
  """Params of :func:`plain_forward`: stacked layers, ``[L, ...]`` kernels."""
  ks = jax.random.split(key, 5)
  n = cfg.layers

  def normal(k, shape, s=0.05):
    return s * jax.random.normal(k, shape, jnp.float32)

  return {
    "embedding": normal(ks[0], (cfg.vocab, cfg.embed), 1.0),
    "layers": {
      "wqkv": normal(ks[1], (n, cfg.embed, 3 * cfg.heads * cfg.head_dim)),
      "wo": normal(ks[2], (n, cfg.heads * cfg.head_dim, cfg.embed)),
      "w_up": normal(ks[3], (n, cfg.embed, cfg.hidden)),
      "w_down": normal(ks[4], (n, cfg.hidden, cfg.embed)),
      "norm": jnp.ones((n, cfg.embed)),
    },
  }


def plain_forward(params: dict, tokens: jax.Array, cfg: Config = Config(), fq=None) -> jax.Array:
  """A hand-written decoder on a param dict: ``@`` on raw arrays, ``lax.scan`` over
  stacked layers, a ``remat`` MLP and a nested ``jit``. ``fq`` (test reference only)
  is applied to every weight matmul's activation input."""
  fq = fq or (lambda x: x)
  x = params["embedding"][tokens]

  @jax.checkpoint
  def mlp(x, up, down):
    return fq(jax.nn.relu(fq(x) @ up)) @ down

  def layer(x, w):
    h = x * w["norm"]
    qkv = fq(h) @ w["wqkv"]
    q, k, v = jnp.split(qkv, 3, axis=-1)
    t = x.shape[1]
    q, k, v = (a.reshape(a.shape[:2] + (cfg.heads, cfg.head_dim)) for a in (q, k, v))
    att = jnp.einsum("bthd,bshd->bhts", q, k) * cfg.head_dim**-0.5
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e30)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(att, axis=-1), v)
    x = x + jax.jit(lambda o, wo: fq(o.reshape(o.shape[:2] + (-1,))) @ wo)(o, w["wo"])
    return x + mlp(x, w["w_up"], w["w_down"]), None

  x, _ = lax.scan(layer, x, params["layers"])
  return fq(x) @ params["embedding"].T


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab: int = 256
  dim: int = 128
  heads: int = 2
  hidden: int = 256
  layers: int = 2


def rope(x: jax.Array) -> jax.Array:
  """Rotary position embedding over ``[B, T, N, H]`` (the half-split form)."""
  t, h = x.shape[1], x.shape[-1]
  freq = 10000.0 ** (-jnp.arange(0, h // 2, dtype=jnp.float32) / (h // 2))
  ang = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
  sin, cos = jnp.sin(ang)[None, :, None, :], jnp.cos(ang)[None, :, None, :]
  a, b = x[..., : h // 2], x[..., h // 2 :]
  return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


class LlamaBlock(nn.Module):
  """A Llama decoder layer written with ``nn.Dense`` (q, k, v, o, gate, up, down)."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    hd = c.dim // c.heads
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
    h = nn.RMSNorm(name="attn_norm")(x)
    q, k, v = (
      dense(c.dim, name)(h).reshape(h.shape[:2] + (c.heads, hd)) for name in ("q", "k", "v")
    )
    q, k = rope(q), rope(k)
    att = jnp.einsum("bthd,bshd->bhts", q, k) * hd**-0.5
    t = x.shape[1]
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e30)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(att, axis=-1), v)
    x = x + dense(c.dim, "o")(o.reshape(x.shape))
    h = nn.RMSNorm(name="mlp_norm")(x)
    g = jax.nn.silu(dense(c.hidden, "gate")(h)) * dense(c.hidden, "up")(h)
    return x + dense(c.dim, "down")(g)


class LlamaScanBlock(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, _):
    return LlamaBlock(self.cfg, name="block")(x), None


class Llama(nn.Module):
  """A Llama-architecture decoder; ``scan=True`` stacks the layers with ``nn.scan``."""

  cfg: LlamaConfig = LlamaConfig()
  scan: bool = False

  @nn.compact
  def __call__(self, tokens):
    c = self.cfg
    x = nn.Embed(c.vocab, c.dim, name="embed")(tokens)
    if self.scan:
      stack = nn.scan(
        LlamaScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.layers
      )(c, name="layers")
      x, _ = stack(x, None)
    else:
      for i in range(c.layers):
        x = LlamaBlock(c, name=f"layers_{i}")(x)
    return nn.Dense(c.vocab, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm")(x))


class _HFRMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


class _HFAttention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, h):
    c = self.cfg
    hd = c.dim // c.heads
    proj = lambda name: nn.Dense(c.dim, use_bias=False, name=name)  # noqa: E731
    heads = h.shape[:2] + (c.heads, hd)
    q, k, v = (proj(n)(h).reshape(heads) for n in ("q_proj", "k_proj", "v_proj"))
    q, k = rope(q), rope(k)
    t = h.shape[1]
    att = jnp.einsum("bthd,bshd->bhts", q, k) * hd**-0.5
    att = jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e30)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(att, axis=-1), v)
    return proj("o_proj")(o.reshape(h.shape))


class _HFMLP(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, h):
    c = self.cfg
    dense = lambda n, name: nn.Dense(n, use_bias=False, name=name)  # noqa: E731
    g = jax.nn.silu(dense(c.hidden, "gate_proj")(h)) * dense(c.hidden, "up_proj")(h)
    return dense(c.dim, "down_proj")(g)


class _HFLayer(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    x = x + _HFAttention(self.cfg, name="self_attn")(_HFRMSNorm(name="input_layernorm")(x))
    return x + _HFMLP(self.cfg, name="mlp")(_HFRMSNorm(name="post_attention_layernorm")(x))


class _HFLayers(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x):
    for i in range(self.cfg.layers):
      x = _HFLayer(self.cfg, name=str(i))(x)
    return x


class _HFModel(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.cfg.vocab, self.cfg.dim, name="embed_tokens")(tokens)
    return _HFRMSNorm(name="norm")(_HFLayers(self.cfg, name="layers")(x))


class HFLlama(nn.Module):
  """A Llama decoder with Hugging Face's ``FlaxLlamaForCausalLM`` param names
  (``model/layers/{i}/self_attn/q_proj/kernel``, ``lm_head/kernel``, ...)."""

  cfg: LlamaConfig = LlamaConfig()

  @nn.compact
  def __call__(self, tokens):
    x = _HFModel(self.cfg, name="model")(tokens)
    return nn.Dense(self.cfg.vocab, use_bias=False, name="lm_head")(x)


def greedy(fn, params, prompt=(1, 17, 42), steps=8) -> np.ndarray:
  """``steps`` greedy tokens after ``prompt`` from ``fn(params, tokens) -> logits``.

  One shape for every step (one compilation): the model is causal, so the
  positions after the last token never change the logits read.
  """
  tokens = np.zeros((1, len(prompt) + steps), np.int32)
  tokens[0, : len(prompt)] = prompt
  for n in range(len(prompt), len(prompt) + steps):
    tokens[0, n] = int(jnp.argmax(fn(params, jnp.asarray(tokens))[0, n - 1]))
  return tokens
