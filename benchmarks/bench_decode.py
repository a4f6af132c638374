"""Greedy decoding tokens/s of a Llama-style Linen decoder: float vs int8 weight-only vs W8A8.

The model (``Decoder``): token embedding, ``--layers`` pre-norm blocks (RMSNorm,
grouped-query attention with rotary embeddings and a KV cache, SwiGLU MLP),
final RMSNorm and an untied LM head, all ``nn.Dense`` / ``nn.DenseGeneral``,
random weights. Each step is one jitted call that reads the whole model once:
a prompt of ``--prompt`` tokens is prefilled, then ``--steps`` tokens are
decoded greedily; tokens/s = batch x steps / decode time (median of
``--repeats``). Quantized variants run the same Linen model through
``sq.apply`` (``impl="auto"``: the implementation measured fastest here).

Sizes: ``--config gpu`` is about 1.1B parameters (d=2048, 16 layers, 32 heads
of 64, 8 KV heads, MLP 8192, vocab 32000), ``--config cpu`` about 77M
(d=1024, 4 layers, 16 heads, 4 KV heads, MLP 4096, vocab 8192). Activations
are bf16 on GPU, float32 on CPU (where XLA's bf16 GEMMs are slow; the bf16
column is shown anyway).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine

import sensorquant_jax as sq


@dataclasses.dataclass(frozen=True)
class Config:
  d: int
  layers: int
  heads: int
  kv_heads: int
  mlp: int
  vocab: int
  max_len: int = 256


CONFIGS = {
  "gpu": Config(2048, 16, 32, 8, 8192, 32000),
  "cpu": Config(1024, 4, 16, 4, 4096, 8192),
  "tiny": Config(128, 2, 4, 2, 256, 512, 64),
}


def _rope(x, pos):
  """Rotary embedding of ``x [B, T, H, hd]`` at positions ``pos [T]``."""
  hd = x.shape[-1]
  freq = 1.0 / (10000 ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  ang = pos[:, None].astype(jnp.float32) * freq[None]
  cos, sin = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("scale", nn.initializers.ones, (x.shape[-1],))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    return (y * w).astype(x.dtype)


class Block(nn.Module):
  cfg: Config
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, cache_k, cache_v, start):
    cfg, dt = self.cfg, self.dtype
    hd = cfg.d // cfg.heads
    t = x.shape[1]
    pos = start + jnp.arange(t)
    h = RMSNorm(name="attn_norm")(x)
    dense = lambda feats, name: nn.DenseGeneral(feats, use_bias=False, dtype=dt, name=name)  # noqa: E731
    q = _rope(dense((cfg.heads, hd), "q")(h), pos)
    k = _rope(dense((cfg.kv_heads, hd), "k")(h), pos)
    v = dense((cfg.kv_heads, hd), "v")(h)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, start, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, start, 0, 0))
    group = cfg.heads // cfg.kv_heads
    qg = q.reshape(q.shape[0], t, cfg.kv_heads, group, hd)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, cache_k).astype(jnp.float32) / np.sqrt(hd)
    mask = jnp.arange(cfg.max_len)[None, :] <= pos[:, None]
    s = jnp.where(mask, s, -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(cache_v.dtype)
    o = jnp.einsum("bkgts,bskh->btkgh", p, cache_v).reshape(q.shape)
    x = x + nn.DenseGeneral(cfg.d, axis=(-2, -1), use_bias=False, dtype=dt, name="o")(o)
    h = RMSNorm(name="mlp_norm")(x)
    gate = nn.Dense(cfg.mlp, use_bias=False, dtype=dt, name="gate")(h)
    up = nn.Dense(cfg.mlp, use_bias=False, dtype=dt, name="up")(h)
    x = x + nn.Dense(cfg.d, use_bias=False, dtype=dt, name="down")(jax.nn.silu(gate) * up)
    return x, cache_k, cache_v


class Decoder(nn.Module):
  cfg: Config
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, caches, start):
    x = nn.Embed(self.cfg.vocab, self.cfg.d, dtype=self.dtype, name="embed")(tokens)
    new = []
    for i, (ck, cv) in enumerate(caches):
      x, ck, cv = Block(self.cfg, self.dtype, name=f"block{i}")(x, ck, cv, start)
      new.append((ck, cv))
    x = RMSNorm(name="norm")(x)
    logits = nn.Dense(self.cfg.vocab, use_bias=False, dtype=self.dtype, name="head")(x[:, -1])
    return logits, new


def empty_caches(cfg: Config, batch: int, dtype):
  hd = cfg.d // cfg.heads
  shape = (batch, cfg.max_len, cfg.kv_heads, hd)
  return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.layers)]


def decode_time(step, params, cfg, batch, prompt, steps, dtype, repeats):
  """Median seconds of ``steps`` greedy tokens after a prefill, and the tokens made."""
  rng = np.random.default_rng(batch)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab, (batch, prompt)), jnp.int32)
  times, out = [], None
  for _ in range(repeats + 1):  # the first run compiles
    caches = empty_caches(cfg, batch, dtype)
    logits, caches = step(params, tokens, caches, 0)
    nxt = jnp.argmax(logits, -1)[:, None].astype(jnp.int32)
    jax.block_until_ready(nxt)
    made = []
    t = time.perf_counter()
    for i in range(steps):
      logits, caches = step(params, nxt, caches, prompt + i)
      nxt = jnp.argmax(logits, -1)[:, None].astype(jnp.int32)
      made.append(nxt)
    jax.block_until_ready(nxt)
    times.append(time.perf_counter() - t)
    out = np.concatenate([np.asarray(m) for m in made], axis=1)
  return statistics.median(times[1:]), out


def main():
  gpu = jax.default_backend() == "gpu"
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="gpu" if gpu else "cpu", choices=CONFIGS)
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--prompt", type=int, default=16)
  ap.add_argument("--steps", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--scheme", default="symmetric_per_channel_int8")
  args = ap.parse_args()
  cfg = CONFIGS[args.config]
  act = jnp.bfloat16 if gpu else jnp.float32
  print(machine())
  model = Decoder(cfg, act)
  caches = empty_caches(cfg, 1, act)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), caches, 0)
  params = jax.tree.map(lambda p: p * 0.5, params)  # keeps activations tame with random weights
  n_params = sum(p.size for p in jax.tree.leaves(params))
  qparams = sq.quantize(params, args.scheme)
  print(
    f"jax {jax.__version__}, config {args.config}: {n_params / 1e6:.0f}M parameters, "
    f"{jnp.dtype(act).name} activations, prompt {args.prompt}, {args.steps} decoded tokens, "
    f"median of {args.repeats}; int8 tree {sq.nbytes(qparams) / 2**20:.0f} MiB"
  )

  def float_step(dtype):
    m = Decoder(cfg, dtype)
    return jax.jit(lambda p, t, c, s: m.apply(p, t, c, s)), jax.tree.map(
      lambda p: p.astype(dtype), params
    )

  def quant_step(mode):
    return jax.jit(lambda p, t, c, s: sq.apply(model, p, t, c, s, mode=mode)), qparams

  variants = {"bf16": float_step(jnp.bfloat16)}
  if not gpu:
    variants = {"f32": float_step(jnp.float32), **variants}
  variants["int8 w-only"] = quant_step("weight_only")
  variants["int8 W8A8"] = quant_step("w8a8")
  base = "bf16" if gpu else "f32"
  header = " ".join(f"{name:>14s}" for name in variants)
  print(f"\n{'batch':>5s} {header}   (tokens/s; ratio to {base})")
  for b in (int(v) for v in args.batches.split(",")):
    rates, tokens = {}, {}
    for name, (step, p) in variants.items():
      c_dtype = jnp.bfloat16 if name == "bf16" else act
      t, made = decode_time(step, p, cfg, b, args.prompt, args.steps, c_dtype, args.repeats)
      rates[name] = b * args.steps / t
      tokens[name] = made
    cells = " ".join(f"{rates[n]:7.0f} {rates[n] / rates[base]:5.2f}x" for n in variants)
    agree = {n: float(np.mean(tokens[n] == tokens[base])) for n in variants if n != base}
    print(
      f"{b:5d} {cells}   greedy tokens equal to {base}: "
      + ", ".join(f"{n} {v:.0%}" for n, v in agree.items()),
      flush=True,
    )


if __name__ == "__main__":
  main()
