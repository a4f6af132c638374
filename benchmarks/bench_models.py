"""LLM-style model code on quantized params through the op-level transform (``sq.quantized``).

Models with layers 1024 wide: a Gemma-style decoder written with ``Einsum`` layers
(``tests/llm_models.py``), Google's RecurrentGemma ``Griffin`` (the pinned
external package) and a plain function of a param dict with ``lax.scan`` over
stacked layers. For each: one-token decode and a 64-token prefill at batch 1,
float32 against int8 weight-only (per-channel, axes from ``like=``) and int4
(group 128), medians of alternating rounds, and XLA's compiled temporaries.

Run from the repository root: ``python benchmarks/bench_models.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import machine, median_times  # noqa: E402

import sensorquant_jax as sq  # noqa: E402
from tests import llm_models as M  # noqa: E402

WIDE = M.Config(vocab=8192, embed=1024, heads=8, kv_heads=1, head_dim=128, hidden=4096, layers=4)


def gemma_like():
  model = M.Transformer(WIDE, "scan")

  def fwd(v, t):
    return model.apply(v, t)

  return "gemma-like einsum (nn.scan)", fwd, lambda t: model.init(jax.random.key(0), t)


def plain():
  def fwd(p, t):
    return M.plain_forward(p, t, WIDE)

  return "plain function (lax.scan)", fwd, lambda t: M.init_plain(WIDE, jax.random.key(0))


def griffin():
  import recurrentgemma.jax as rg

  blocks = (rg.TemporalBlockType.RECURRENT,) * 2 + (rg.TemporalBlockType.ATTENTION,)
  cfg = rg.GriffinConfig(
    vocab_size=8192,
    width=1024,
    mlp_expanded_width=3072,
    num_heads=8,
    block_types=blocks * 2,
    embeddings_scale_by_sqrt_dim=True,
    attention_window_size=256,
    logits_soft_cap=30.0,
    lru_width=1024,
  )
  model = rg.Griffin(cfg)

  def fwd(v, t):
    pos = jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape)
    return model.apply(v, t, pos, return_cache=False)[0]

  def init(t):
    return model.init(jax.random.key(0), t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape))

  return "RecurrentGemma Griffin", fwd, init


def temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--models", default="gemma,plain,griffin")
  args = ap.parse_args()
  print(f"machine: {machine()}; jax {jax.__version__}")
  makers = {"gemma": gemma_like, "plain": plain, "griffin": griffin}
  print(
    "| model | tokens | float32 ms | int8 ms | int8 / f32 speed | int4 ms | int4 / f32 speed "
    "| temp MB f32 / int8 / int4 |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for key in args.models.split(","):
    name, fwd, init = makers[key]()
    params = init(jnp.zeros((1, 8), jnp.int32))
    for tokens in (1, 64):
      t = jax.random.randint(jax.random.key(tokens), (1, tokens), 0, 8192)
      q8 = sq.quantize(params, sq.PER_CHANNEL, like=(fwd, t))
      q4 = sq.quantize(params, sq.INT4, like=(fwd, t))
      f8 = jax.jit(sq.quantized(fwd))
      ff = jax.jit(fwd)
      calls = {"f32": (ff, (params, t)), "int8": (f8, (q8, t)), "int4": (f8, (q4, t))}
      times = median_times(calls, args.repeats)
      temps = [temp_bytes(fwd, params, t)] + [temp_bytes(sq.quantized(fwd), q, t) for q in (q8, q4)]
      print(
        f"| {name} | {tokens} | {times['f32'] * 1e3:.2f} | {times['int8'] * 1e3:.2f} "
        f"| {times['f32'] / times['int8']:.2f}x | {times['int4'] * 1e3:.2f} "
        f"| {times['f32'] / times['int4']:.2f}x | "
        + " / ".join(f"{b / 2**20:.1f}" for b in temps)
        + " |",
        flush=True,
      )


if __name__ == "__main__":
  main()
