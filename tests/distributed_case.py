"""The model, params and batches that tests/test_distributed.py and its worker share."""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from llm_models import Llama, LlamaConfig

import sensorquant_jax as sq
from sensorquant_jax._src.tree_paths import path_str as path_str

ORACLE = os.path.join(os.path.dirname(__file__), "fixtures", "oracle", "per_tensor_cases.npz")
SCHEMES = ("symmetric_per_channel_int8", "asymmetric_per_group_int4")
CFG = LlamaConfig(vocab=256, dim=128, heads=2, hidden=256, layers=1)
PROCESSES, BATCHES = 2, 3
POLICY_SQNR_DB = 40.0  # takes two schemes on these params


def model() -> Llama:
  return Llama(CFG)


def mesh(devices: np.ndarray) -> Mesh:
  return Mesh(devices, ("a", "b"))


def float_params() -> dict:
  """Float params (the same on every process: drawn from a fixed seed)."""
  shapes = jax.eval_shape(model().init, jax.random.key(0), np.zeros((1, 8), np.int32))
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(np.float32), shapes)


def big_params(i: int) -> dict:
  """Round ``i`` of the crash test: 8 MiB of float32 kernels, and the round's number."""
  rng = np.random.default_rng(100 + i)
  kernels = {f"w{j}": rng.standard_normal((512, 1024)).astype(np.float32) for j in range(4)}
  return {"kernels": kernels, "round": i}


def spec_for(x) -> P:
  """Kernels split along their input axis between the processes (mesh axis "a"); the rest
  replicated.

  Split so, every sum across devices adds two terms, which gives the same bits in any
  order: a forward across processes can then match one process bit for bit (sums of more
  terms follow each collective library's own order).
  """
  return P("a", None) if np.ndim(x) == 2 else P()


def fitted(spec: P, shape: tuple[int, ...], m: Mesh) -> P:
  """``spec`` without the mesh axes that do not divide their array axis (e.g. a scale's 1)."""
  out = []
  for i, names in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    group = (names,) if isinstance(names, str) else tuple(names or ())
    size = int(np.prod([m.shape[n] for n in group])) if group else 1
    out.append(names if group and shape[i] % size == 0 else None)
  return P(*out)


def place(tree, m: Mesh, spec=spec_for):
  """``tree``'s arrays as global arrays on ``m`` (each process fills only its shards)."""

  def one(x):
    if not hasattr(x, "shape"):
      return x
    sharding = NamedSharding(m, fitted(spec(x), x.shape, m))
    return jax.make_array_from_callback(x.shape, sharding, lambda i: x[i])

  return jax.tree.map(one, tree)


def qarrays(tree):
  return [
    (path_str(p), x)
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=sq.is_qarray)[0]
    if sq.is_qarray(x)
  ]


def tokens() -> np.ndarray:
  return np.random.default_rng(2).integers(0, CFG.vocab, (8, 16)).astype(np.int32)


def batches(process: int) -> list[np.ndarray]:
  """Process ``process``'s own calibration batches (4 sequences of 16 tokens each)."""
  rng = np.random.default_rng(3)
  every = rng.integers(0, CFG.vocab, (BATCHES, PROCESSES, 4, 16)).astype(np.int32)
  return [every[i, process] for i in range(BATCHES)]


def oracle_inputs() -> list[tuple[str, np.ndarray]]:
  """The Rust-oracle per-tensor cases that split evenly over 8 devices."""
  data = np.load(ORACLE)
  names = sorted({k.split("__")[0] for k in data.files})
  flat = [(n, data[n + "__w"].reshape(-1)) for n in names]
  return [(n, w) for n, w in flat if w.size % 8 == 0]


def oracle_expected(name: str) -> tuple[np.ndarray, np.ndarray]:
  data = np.load(ORACLE)
  return data[name + "__q"], data[name + "__scale"]


def write_source(path: str) -> dict:
  """A float .safetensors checkpoint for the streaming test; returns its arrays."""
  from safetensors.numpy import save_file

  rng = np.random.default_rng(4)
  arrays = {
    "layers.0.kernel": rng.standard_normal((512, 256)).astype(np.float32),
    "layers.0.bias": rng.standard_normal(256).astype(np.float32),
    "embed.embedding": rng.standard_normal((1000, 64)).astype(np.float32),
    "odd.kernel": rng.standard_normal((3, 1025)).astype(np.float32),  # no axis splits in 2
  }
  save_file(arrays, path)
  return arrays


def rule_json(rule: sq.Rule) -> list:
  """A policy rule as JSON-able values (to compare what two processes chose)."""
  axes = None if rule.axes is None else list(rule.axes)
  return [rule.pattern, rule.scheme, axes, rule.block_size]


# Other model styles across processes: a plain function of a param dict with a
# ``lax.scan`` over stacked layers, Linen ``Einsum`` layers under ``nn.scan`` and an NNX
# model. Each leaf is split between the processes along its first axis (a stack's
# layer axis, a table's rows, a kernel's input axis) where the count divides it.
STYLES = {  # style: scheme (the NNX model's kernels are narrower than an int4 group)
  "plain_scan": "asymmetric_per_group_int4",
  "linen_einsum_scan": "asymmetric_per_group_int4",
  "nnx": "symmetric_per_channel_int8",
}
STYLE_MIN_SIZE = 256
STYLE_VOCAB = 512  # the first layer's inputs span as many dimensions as distinct tokens


def first_axis_spec(x) -> P:
  return P("a") if np.ndim(x) >= 2 and x.shape[0] % PROCESSES == 0 else P()


def style_tokens() -> np.ndarray:
  return np.random.default_rng(5).integers(0, STYLE_VOCAB, (4, 16)).astype(np.int32)


def style_batches(process: int) -> list[np.ndarray]:
  """Process ``process``'s GPTQ batches for the plain model: 2 x 8 x 48 tokens each, so
  that the 1536 tokens of all batches (from 512 distinct ones) exceed every kernel's
  input width (512).

  With fewer tokens than inputs, ``X^T X`` is singular and GPTQ's int4 codes follow
  the last bits of the sums: one process alone, given the same tokens in batches of
  another size, then agrees with itself on only 60-80% of codes (as good a model).
  """
  rng = np.random.default_rng(6)
  every = rng.integers(0, STYLE_VOCAB, (2, PROCESSES, 8, 48)).astype(np.int32)
  return [every[i, process] for i in range(2)]


def plain_model():
  """``(fn(params, tokens), float params)`` of the plain-function decoder."""
  import llm_models as M

  cfg = M.Config(vocab=STYLE_VOCAB)
  params = jax.tree.map(np.asarray, M.init_plain(cfg, jax.random.key(7)))
  return (lambda p, t: M.plain_forward(p, t, cfg)), params


def linen_model():
  """``(module, float params)`` of the Gemma-style Linen decoder under ``nn.scan``."""
  import llm_models as M

  model = M.Transformer(M.Config(vocab=STYLE_VOCAB), style="scan")
  params = model.init(jax.random.key(8), style_tokens())
  return model, jax.tree.map(np.asarray, params)


def nnx_model(m: Mesh | None = None):
  """The NNX transformer of tests/models.py, its params placed on ``m`` if given."""
  from flax import nnx
  from models import NNXTransformer

  model = NNXTransformer(vocab=STYLE_VOCAB, rngs=nnx.Rngs(9))
  if m is not None:
    _, state = nnx.split(model, nnx.Param)
    nnx.update(model, place(state, m, first_axis_spec))
  return model


def nnx_qarrays(qmodel):
  from flax import nnx

  _, params, _ = nnx.split(qmodel.model, nnx.Param, ...)
  return qarrays(nnx.to_pure_dict(params))
