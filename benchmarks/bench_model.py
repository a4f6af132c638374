"""A >= 25M-parameter Linen encoder: float vs ours (weight-only, W8A8) vs Qwix PTQ.

Latency (median of ``--repeats`` jitted calls, in alternating rounds) at
batch 1 and 64 and params memory, all on the same model, machine and process.
Ratios are float32 time / variant time (higher is faster). Qwix runs its PTQ path
(``qwix.quantize_model`` + ``qwix.quantize_params``) with int8 weights
(weight-only) and int8 weights and activations (W8A8).
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _timing import median_times

import sensorquant_jax as sq


class Encoder(nn.Module):
  d_model: int = 512
  depth: int = 8
  heads: int = 8
  mlp: int = 2048
  channels: int = 64
  classes: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.d_model, name="patch_embed")(x)
    for i in range(self.depth):
      h = nn.LayerNorm(name=f"ln1_{i}")(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name=f"attn_{i}")(h, h)
      h = nn.LayerNorm(name=f"ln2_{i}")(x)
      h = nn.Dense(self.mlp, name=f"mlp_in_{i}")(h)
      x = x + nn.Dense(self.d_model, name=f"mlp_out_{i}")(nn.gelu(h))
    return nn.Dense(self.classes, name="head")(nn.LayerNorm(name="ln_f")(x).mean(axis=1))


def _tree_bytes(tree):
  return sum(int(x.nbytes) for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes"))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batches", default="1,64")
  ap.add_argument("--seq", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--scheme", default="symmetric_per_channel_int8")
  ap.add_argument("--no-qwix", action="store_true")
  args = ap.parse_args()

  model = Encoder()
  x0 = jnp.zeros((1, args.seq, model.channels))
  params = model.init(jax.random.key(0), x0)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  qparams = sq.quantize(params, args.scheme)
  packed = sq.pack(qparams)
  variants = {
    "float32": (jax.jit(model.apply), params),
    "ours weight-only": (jax.jit(lambda p, x: sq.apply(model, p, x)), packed),
    "ours W8A8": (jax.jit(lambda p, x: sq.apply(model, p, x, mode="w8a8")), packed),
  }
  if not args.no_qwix:
    import qwix

    for name, act in (("qwix weight-only", None), ("qwix W8A8", jnp.int8)):
      rule = qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=act)
      qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
      abstract = jax.eval_shape(qmodel.init, jax.random.key(0), x0)["params"]
      qw = {"params": qwix.quantize_params(params["params"], abstract)}
      variants[name] = (jax.jit(qmodel.apply), qw)

  print(
    f"Encoder: {n_params / 1e6:.1f}M params, seq {args.seq}, scheme {args.scheme}, "
    f"jax {jax.__version__} on {jax.devices()[0].platform}; median of {args.repeats}"
  )
  rng = np.random.default_rng(0)
  xs = {
    b: jnp.asarray(rng.standard_normal((b, args.seq, model.channels)), jnp.float32)
    for b in (int(v) for v in args.batches.split(","))
  }
  ref = {b: variants["float32"][0](params, x) for b, x in xs.items()}
  header = (
    f"{'variant':18s} {'params MB':>9s}"
    + "".join(f" {'b=' + str(b) + ' ms':>10s} {'x f32':>6s}" for b in xs)
    + f" {'max|err|':>9s}"
  )
  print(header)
  times, errs = {}, dict.fromkeys(variants, 0.0)
  for b, x in xs.items():
    reps = args.repeats if b <= 8 else max(3, args.repeats // 2)
    times[b] = median_times({name: (fn, (p, x)) for name, (fn, p) in variants.items()}, reps)
    for name, (fn, p) in variants.items():
      errs[name] = max(errs[name], float(jnp.max(jnp.abs(fn(p, x) - ref[b]))))
  for name, (_, p) in variants.items():
    row = f"{name:18s} {_tree_bytes(p) / 1e6:9.1f}"
    for b in xs:
      t = times[b][name]
      row += f" {t * 1e3:10.2f} {times[b]['float32'] / t:6.2f}"
    print(row + f" {errs[name]:9.2e}", flush=True)


if __name__ == "__main__":
  main()
