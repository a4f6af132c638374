"""One of the processes of tests/test_distributed.py (not a test).

    python _distributed_worker.py main OUT DEST
    python _distributed_worker.py crash OUT DEST
    python _distributed_worker.py tuning OUT DEST

Started by ``sensorquant_jax._src.distributed.launch`` (2 processes x 4 CPU
devices), it joins the others and, with params sharded over a (2, 4) mesh that
spans both processes:

``main``: quantizes (per-tensor int8 on the Rust-oracle cases, per-channel
int8 and int4 on a Llama-style model), runs the quantized forward, saves the
int4 tree to DEST and restores it, and runs GPTQ with each process feeding its
own batches; then streams OUT/src.safetensors to OUT/streamed. Process 0
writes the gathered results to OUT/main.npz; each process writes the bytes it
holds (and read) to OUT/held_<process>.json.

It then does the same in the other model styles (``distributed_case.STYLES``):
quantizes, runs the quantized forward and (plain function) runs GPTQ.

``tuning``: with measuring on, each process timing its own way (process 1's timings
reversed), chooses implementations for a fake problem and for a sharded quantized
forward; writes its choices and the forward's output to OUT/tuning_<process>.json.

``crash``: saves a first checkpoint to DEST, then a second one over it, during
which process 1 kills itself with SIGKILL (the time in OUT/killed_at).
"""

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sensorquant_jax._src import distributed  # noqa: E402

distributed.initialize()

import distributed_case as case  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import sensorquant_jax as sq  # noqa: E402
from sensorquant_jax._src import checkpoint, stream  # noqa: E402


def gather(x) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def held_bytes(x) -> int:
  """Bytes of the distinct shards this process holds (replicas on its devices counted once)."""
  seen = {}
  for s in x.addressable_shards:
    seen[str(s.index)] = s.data.nbytes
  return sum(seen.values())


def main(out: str, dest: str) -> None:
  mesh = case.mesh(np.array(jax.devices()).reshape(2, 4))
  me = jax.process_index()
  result = {}
  # Per-tensor int8 on the oracle's cases, each spread over all 8 devices.
  for name, w in case.oracle_inputs():
    x = jax.make_array_from_callback(
      w.shape, NamedSharding(mesh, P(("a", "b"))), lambda i, w=w: w[i]
    )
    qa = sq.quantize({"w": x}, rules=[("w", sq.PER_TENSOR)])["w"]
    result[f"oracle/{name}/q"] = gather(qa.values)
    result[f"oracle/{name}/scale"] = gather(qa.scale)
  params = case.place(case.float_params(), mesh)
  held = {}
  for scheme in case.SCHEMES:
    q = sq.quantize(params, scheme)
    for path, x in case.qarrays(q):
      for field in ("values", "scale", "zero_point"):
        a = getattr(x, field)
        if a is not None:
          result[f"{scheme}/{path}/{field}"] = gather(a)
          held[f"{scheme}/{path}/{field}"] = [held_bytes(a), int(a.nbytes)]
  q8 = sq.quantize(params, case.SCHEMES[0])
  tokens = case.tokens()
  logits = jax.jit(lambda q, t: sq.apply(case.model(), q, t))(q8, tokens)
  result["forward"] = gather(logits)
  q4 = sq.quantize(params, case.SCHEMES[1])
  sq.save(dest, q4)
  back = sq.restore(dest, like=q4)
  for (path, a), (_, b) in zip(case.qarrays(q4), case.qarrays(back), strict=True):
    assert b.values.sharding == a.values.sharding, path
    result[f"restored/{path}/values"] = gather(b.values)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the embedding table stays round-to-nearest
    g = sq.gptq(case.model(), params, case.batches(me), case.SCHEMES[1], progress=False)
  for path, x in case.qarrays(g):
    result[f"gptq/{path}/values"] = gather(x.values)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    a = sq.awq(case.model(), params, case.batches(me), case.SCHEMES[1], progress=False)
  for path, x in case.qarrays(a):
    result[f"awq/{path}/values"] = gather(x.values)
    result[f"awq/{path}/scale"] = gather(x.scale)
    if x.input_scale is not None:
      result[f"awq/{path}/input_scale"] = gather(x.input_scale)
  smooth = sq.smoothquant(case.model(), params, case.batches(me), alpha=0.5)
  scaled = lambda x: isinstance(x, sq.InputScaled)  # noqa: E731
  for path, x in jax.tree_util.tree_flatten_with_path(smooth, is_leaf=scaled)[0]:
    if scaled(x):
      result[f"smoothquant/{case.path_str(path)}"] = gather(x.input_scale)
  for name, c in sq.calibrate(case.model(), params, case.batches(me)).items():
    result[f"calibrate/{name}"] = np.array([c.act_min, c.act_max], np.float64)
  rep = sq.report(params, q8, model=case.model(), batches=case.batches(me), show=False)
  result["report"] = np.array(json.dumps(rep).encode())
  policy = sq.auto_policy(params, budget=sq.Budget(min_sqnr_db=case.POLICY_SQNR_DB))
  result["policy"] = np.array(json.dumps([case.rule_json(r) for r in policy.rules]).encode())
  # Streaming: each process reads only its part of every leaf it can split.
  read = {"bytes": 0}
  regions = checkpoint.iter_float_regions

  def counted(src):
    for name, shape, dtype, region in regions(src):

      def region_counted(index, region=region):
        x = region(index)
        read["bytes"] += x.nbytes
        return x

      yield name, shape, dtype, region_counted

  styles(mesh, me, result)
  checkpoint.iter_float_regions = counted
  summary = stream.quantize_file(
    os.path.join(out, "src.safetensors"), os.path.join(out, "streamed")
  )
  held["stream/read"] = [read["bytes"], summary["float_bytes"]]
  with open(os.path.join(out, f"held_{me}.json"), "w") as f:
    json.dump(held, f)
  if me == 0:
    np.savez(os.path.join(out, "main.npz"), **result)


def styles(mesh, me: int, result: dict) -> None:
  """Quantize and the quantized forward in every style; GPTQ on the plain function."""
  from flax import nnx

  tokens = case.style_tokens()
  for style, scheme in case.STYLES.items():
    if style == "nnx":
      like = (lambda m, t: m(t), tokens)
      q = sq.nnx.quantize(case.nnx_model(mesh), scheme, min_size=case.STYLE_MIN_SIZE, like=like)
      pairs = case.nnx_qarrays(q)
      logits = nnx.jit(lambda m, t: m(t))(q, tokens)
    else:
      fn, host = case.plain_model() if style == "plain_scan" else case.linen_model()
      apply = fn if style == "plain_scan" else fn.apply
      params = case.place(host, mesh, case.first_axis_spec)
      like = (apply, tokens)
      q = sq.quantize(params, scheme, min_size=case.STYLE_MIN_SIZE, like=like)
      pairs = case.qarrays(q)
      logits = jax.jit(sq.quantized(apply))(q, tokens)
    for path, x in pairs:
      result[f"{style}/{path}/values"] = gather(x.values)
      result[f"{style}/{path}/scale"] = gather(x.scale)
    result[f"{style}/forward"] = gather(logits)
  fn, host = case.plain_model()
  params = case.place(host, mesh, case.first_axis_spec)
  like = (fn, tokens)
  g = sq.gptq(
    fn,
    params,
    case.style_batches(me),
    case.STYLES["plain_scan"],
    like=like,
    min_size=case.STYLE_MIN_SIZE,
    progress=False,
  )
  for path, x in case.qarrays(g):
    result[f"plain_scan/gptq/{path}/values"] = gather(x.values)


def crash(out: str, dest: str) -> None:
  mesh = case.mesh(np.array(jax.devices()).reshape(2, 4))
  me = jax.process_index()
  sq.save(dest, sq.quantize(case.place(case.big_params(0), mesh), sq.PER_TENSOR))
  q = sq.quantize(case.place(case.big_params(1), mesh), sq.PER_TENSOR)
  if me == 1:
    write = checkpoint.CheckpointWriter._flush

    def killed(self):
      # Once every process has begun the save (the folder exists) and before
      # the arrays are written: SIGKILL, as the OOM killer or a scheduler would.
      with open(os.path.join(out, "killed_at"), "w") as f:
        f.write(repr(time.time()))
      os.kill(os.getpid(), signal.SIGKILL)
      write(self)

    checkpoint.CheckpointWriter._flush = killed
  sq.save(dest, q, overwrite=True)
  time.sleep(600)  # process 0: never reached


def tuning(out: str, dest: str) -> None:
  from sensorquant_jax._src import tuning as tuning_mod

  me = jax.process_index()
  # Each process its own tuning file, and its own opinion: process 0 finds the shipped
  # fallback (the first candidate) fastest, process 1 the last.
  path = Path(out) / f"tuning_cache_{me}.json"
  tuning_mod.cache_path = lambda: path
  tuning_mod.clear_memory()

  def measure(candidates, example):
    order = list(candidates)
    return {name: float(i if me == 0 else -i) for i, name in enumerate(order)}

  tuning_mod.measure = measure
  problem = tuning_mod.Problem("w8a8", "fake", 1, 1, 1, "float32")
  fake = tuning_mod.choose(problem, {"a": abs, "b": abs}, lambda seed: (np.zeros(4),))
  mesh = case.mesh(np.array(jax.devices()).reshape(2, 4))
  params = case.place(case.float_params(), mesh)
  q = sq.quantize(params, case.SCHEMES[0])
  with tuning_mod.recording() as choices:
    logits = jax.jit(lambda q, t: sq.apply(case.model(), q, t, mode="w8a8"))(q, case.tokens())
  result = {"fake": fake, "choices": choices, "forward": gather(logits).tolist()}
  with open(os.path.join(out, f"tuning_{me}.json"), "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  what, out, dest = sys.argv[1:4]
  {"main": main, "crash": crash, "tuning": tuning}[what](out, dest)
  jax.distributed.shutdown()
