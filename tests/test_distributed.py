"""Two processes x 4 CPU devices on localhost, joined by jax.distributed.

The processes run tests/_distributed_worker.py.

Each test compares what the processes computed on arrays spread over both of
them with the same computation in this one process (8 devices), the Rust
oracle's fixtures, or the saved checkpoint restored here on other meshes.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import distributed_case as case
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sensorquant_jax as sq
from sensorquant_jax._src import distributed
from sensorquant_jax._src.tree_paths import path_str

WORKER = os.path.join(os.path.dirname(__file__), "_distributed_worker.py")
TIMEOUT_S = 600
# One compute thread per process: with the suite's other tests sharing the cores, XLA's
# thread pools in two processes that wait on each other's collectives slowed this run
# from 80 s to over 300 s.
ONE_THREAD = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"}


def _env(process: int, port: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env[distributed.COORDINATOR] = f"127.0.0.1:{port}"
  env[distributed.NUM_PROCESSES] = str(case.PROCESSES)
  env[distributed.PROCESS_ID] = str(process)
  return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The ``main`` scenario's outputs (``distributed.launch``: 2 processes x 4 devices)."""
  out = tmp_path_factory.mktemp("distributed_main")
  case.write_source(str(out / "src.safetensors"))
  code = distributed.launch(
    [WORKER, "main", str(out), str(out / "ckpt")],
    case.PROCESSES,
    devices=4,
    timeout_s=TIMEOUT_S,
    grace_s=30,
    env=ONE_THREAD,
  )
  assert code == 0, "the worker processes failed (their output is above)"
  data = np.load(out / "main.npz")
  return out, {k: data[k] for k in data.files}


def _this_mesh(shape=(2, 4)):
  return case.mesh(np.array(jax.devices()).reshape(shape))


def _per_tensor_int8_matches_the_rust_oracle(run):
  _, got = run
  cases = case.oracle_inputs()
  assert len(cases) >= 20
  for name, _ in cases:
    q, scale = case.oracle_expected(name)
    np.testing.assert_array_equal(got[f"oracle/{name}/q"], q.reshape(-1), err_msg=name)
    assert got[f"oracle/{name}/scale"].view(np.uint32) == np.float32(scale).view(np.uint32), name


def _quantize_equals_one_process(run, scheme):
  out, got = run
  expected = sq.quantize(case.float_params(), scheme)
  pairs = case.qarrays(expected)
  assert len(pairs) == 9  # 7 kernels, the embedding table and the head
  for path, x in pairs:
    for field in ("values", "scale", "zero_point"):
      a = getattr(x, field)
      if a is not None:
        np.testing.assert_array_equal(got[f"{scheme}/{path}/{field}"], a, err_msg=path)


def _each_process_holds_only_its_shards(run):
  out, _ = run
  import json

  for process in range(case.PROCESSES):
    with open(out / f"held_{process}.json") as f:
      held = json.load(f)
    assert held
    for key, (mine, total) in held.items():
      if key == "stream/read":  # all but the (3, 1025) leaf split in two
        assert mine == (total - 3 * 1025 * 4) // 2 + 3 * 1025 * 4, (process, mine, total)
      elif key.endswith("/values"):  # kernels split between the processes: half each
        assert mine * case.PROCESSES == total, key
      else:
        assert mine <= total, key


def _sharded_forward_equals_one_process_bit_for_bit(run):
  _, got = run
  mesh = _this_mesh()
  q8 = sq.quantize(case.place(case.float_params(), mesh), case.SCHEMES[0])
  logits = jax.jit(lambda q, t: sq.apply(case.model(), q, t))(q8, case.tokens())
  np.testing.assert_array_equal(got["forward"], np.asarray(logits))
  assert np.isfinite(got["forward"]).all() and np.abs(got["forward"]).max() > 0


def _saved_restores_on_other_meshes(run, shape, spec):
  out, got = run
  expected = sq.quantize(case.float_params(), case.SCHEMES[1])
  mesh = _this_mesh(shape)
  if spec is None:  # the transposed mesh: kernels split the other way round

    def spec(x):
      return P("b", "a") if np.ndim(x) == 2 else P()

  def target(x):
    sharding = NamedSharding(mesh, case.fitted(spec(x), x.shape, mesh))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  like = jax.tree.map(target, expected)
  back = sq.restore(out / "ckpt", like=like)
  chex.assert_trees_all_equal(back, expected)
  for (path, x), (_, y) in zip(case.qarrays(back), case.qarrays(like), strict=True):
    assert x.values.sharding == y.values.sharding, path
    np.testing.assert_array_equal(got[f"restored/{path}/values"], x.values, err_msg=path)


def _logits_error(qparams) -> float:
  """Mean squared distance of the quantized model's logits from the float model's."""
  model, tokens = case.model(), case.tokens()
  ref = model.apply(case.float_params(), tokens)
  return float(np.mean((np.asarray(sq.apply(model, qparams, tokens)) - ref) ** 2))


def _gptq_with_batches_on_each_process_equals_one_process_on_all(run):
  _, got = run
  every = _every_batch()
  with pytest.warns(UserWarning, match="round-to-nearest kept for params/embed/embedding"):
    expected = sq.gptq(case.model(), case.float_params(), every, case.SCHEMES[1], progress=False)
  rtn = sq.quantize(case.float_params(), case.SCHEMES[1])
  spread, equal, total, changed = [], 0, 0, 0
  for (path, x), (_, r) in zip(case.qarrays(expected), case.qarrays(rtn), strict=True):
    mine = got[f"gptq/{path}/values"]
    spread.append((path, dataclasses.replace(x, values=jax.numpy.asarray(mine))))
    # Hessians summed in another order differ in the last bits; GPTQ's rounding
    # follows them for a few codes, and its sequential mode carries them on.
    equal += int(np.sum(mine == np.asarray(x.values)))
    total += mine.size
    changed += int(np.any(np.asarray(x.values) != np.asarray(r.values)))
  assert changed == 8  # GPTQ rounded every kernel but the lookup table its own way
  assert equal / total > 0.9
  across = jax.tree.map(lambda x: x, expected, is_leaf=sq.is_qarray)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(across, is_leaf=sq.is_qarray)
  by_path = dict(spread)
  across = jax.tree_util.tree_unflatten(treedef, [by_path.get(path_str(p), x) for p, x in leaves])
  e_one, e_across, e_rtn = _logits_error(expected), _logits_error(across), _logits_error(rtn)
  print(
    f"codes equal {equal / total:.4f}; logits error rtn {e_rtn:.4g} one {e_one:.4g} "
    f"across {e_across:.4g}"
  )
  assert e_across < e_rtn and e_one < e_rtn
  assert abs(e_across - e_one) < 0.02 * e_one


def _every_batch():
  """What one process is given to match both processes' own batches: theirs, in turn."""
  return [b for i in range(case.BATCHES) for b in (case.batches(0)[i], case.batches(1)[i])]


def _awq_smoothquant_calibrate_with_batches_on_each_process(run):
  _, got = run
  params = case.float_params()
  # Ranges are maxima and minima over every token: exact in any order, but the
  # activations themselves come from programs split differently over devices (last bits).
  cal = sq.calibrate(case.model(), params, _every_batch())
  assert len(cal) == 8
  for name, c in cal.items():
    np.testing.assert_allclose(got[f"calibrate/{name}"], [c.act_min, c.act_max], 1e-5, 0, name)
  # SmoothQuant's scales come from per-channel maxima, likewise.
  smooth = sq.smoothquant(case.model(), params, _every_batch(), alpha=0.5)
  n = 0
  for path, x in jax.tree_util.tree_flatten_with_path(
    smooth, is_leaf=lambda x: isinstance(x, sq.InputScaled)
  )[0]:
    if isinstance(x, sq.InputScaled):
      np.testing.assert_allclose(got[f"smoothquant/{path_str(path)}"], x.input_scale, 1e-5)
      n += 1
  assert n == 8  # every kernel a matmul reads, the head included
  # AWQ's search sums over tokens: sums in another order may tip its grid search to the
  # neighbouring ratio for a kernel (whose codes then all move); the model is as good.
  with pytest.warns(UserWarning):
    awq = sq.awq(case.model(), params, _every_batch(), case.SCHEMES[1], progress=False)
  equal = total = 0
  leaves, treedef = jax.tree_util.tree_flatten_with_path(awq, is_leaf=sq.is_qarray)
  across = []
  for p, x in leaves:
    if sq.is_qarray(x):
      mine = got[f"awq/{path_str(p)}/values"]
      equal += int(np.sum(mine == np.asarray(x.values)))
      total += mine.size
      fields = {"values": mine, "scale": got[f"awq/{path_str(p)}/scale"]}
      if x.input_scale is not None:
        fields["input_scale"] = got[f"awq/{path_str(p)}/input_scale"]
      x = dataclasses.replace(x, **{k: jax.numpy.asarray(v) for k, v in fields.items()})
    across.append(x)
  across = jax.tree_util.tree_unflatten(treedef, across)
  e_one, e_across = _logits_error(awq), _logits_error(across)
  assert equal / total > 0.9
  assert abs(e_across - e_one) < 0.02 * e_one


def _auto_policy_chooses_as_one_process(run):
  import json

  _, got = run
  policy = sq.auto_policy(case.float_params(), budget=sq.Budget(min_sqnr_db=case.POLICY_SQNR_DB))
  rules = [case.rule_json(r) for r in policy.rules]
  assert json.loads(bytes(got["policy"]).decode()) == rules
  assert len({r[1] for r in rules}) >= 2  # the budget took more than one scheme


def _report_with_batches_on_each_process(run):
  import json

  _, got = run
  params = case.float_params()
  q8 = sq.quantize(params, case.SCHEMES[0])
  expected = sq.report(params, q8, model=case.model(), batches=_every_batch(), show=False)
  mine = json.loads(bytes(got["report"]).decode())
  assert mine["layers"] == expected["layers"] and mine["totals"] == expected["totals"]
  for key, value in expected["output"].items():  # the forward is split differently
    assert mine["output"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def _other_styles_equal_one_process(run):
  """A plain function with a scanned stack, Linen einsum layers under nn.scan and NNX:
  quantized as one process does, and their quantized forward equal (bit for bit but NNX's)."""
  from flax import nnx

  _, got = run
  mesh, tokens = _this_mesh(), case.style_tokens()
  for style, scheme in case.STYLES.items():
    if style == "nnx":
      like = (lambda m, t: m(t), tokens)
      one = sq.nnx.quantize(case.nnx_model(), scheme, min_size=case.STYLE_MIN_SIZE, like=like)
      pairs = case.nnx_qarrays(one)
      on_mesh = sq.nnx.quantize(
        case.nnx_model(mesh), scheme, min_size=case.STYLE_MIN_SIZE, like=like
      )
      logits = nnx.jit(lambda m, t: m(t))(on_mesh, tokens)
    else:
      fn, host = case.plain_model() if style == "plain_scan" else case.linen_model()
      apply = fn if style == "plain_scan" else fn.apply
      like = (apply, tokens)
      pairs = case.qarrays(sq.quantize(host, scheme, min_size=case.STYLE_MIN_SIZE, like=like))
      placed = case.place(host, mesh, case.first_axis_spec)
      q = sq.quantize(placed, scheme, min_size=case.STYLE_MIN_SIZE, like=like)
      logits = jax.jit(sq.quantized(apply))(q, tokens)
    assert len(pairs) >= 5, style
    for path, x in pairs:
      np.testing.assert_array_equal(got[f"{style}/{path}/values"], x.values, err_msg=path)
      np.testing.assert_array_equal(got[f"{style}/{path}/scale"], x.scale, err_msg=path)
    if style == "nnx":  # its means over activations add more than two terms across devices
      np.testing.assert_allclose(got[f"{style}/forward"], logits, 1e-5, 1e-6, err_msg=style)
    else:
      np.testing.assert_array_equal(got[f"{style}/forward"], np.asarray(logits), err_msg=style)


def _gptq_on_a_scanned_plain_function(run):
  """GPTQ on the plain function whose stacked layers are split between the processes (each
  holds one layer): the same codes as one process where nothing has drifted yet, and as
  good a model.

  One process is given batch i of both processes as one batch (what the processes make of
  them), so that only the order of the sums differs. GPTQ's int4 rounding carries such
  last-bit differences from column to column and, in its sequential mode, into the next
  layers' inputs: the first layer's codes agree, later kernels drift apart (one process
  given the same tokens in batches of another size drifts as far from itself).
  """
  _, got = run
  fn, host = case.plain_model()
  tokens = case.style_tokens()
  own = [case.style_batches(p) for p in range(case.PROCESSES)]
  every = [np.concatenate([b[i] for b in own]) for i in range(len(own[0]))]
  scheme, like = case.STYLES["plain_scan"], (fn, tokens)
  one = sq.gptq(fn, host, every, scheme, like=like, min_size=case.STYLE_MIN_SIZE, progress=False)
  rtn = sq.quantize(host, scheme, like=like, min_size=case.STYLE_MIN_SIZE)
  equal = total = 0
  leaves, treedef = jax.tree_util.tree_flatten_with_path(one, is_leaf=sq.is_qarray)
  across = []
  for p, x in leaves:
    if sq.is_qarray(x):
      path, mine = path_str(p), got[f"plain_scan/gptq/{path_str(p)}/values"]
      same = mine == np.asarray(x.values)
      equal, total = equal + int(same.sum()), total + same.size
      if path.startswith("layers/"):
        assert same[0].mean() > 0.99, (path, same[0].mean())  # the first layer of the stack
      x = dataclasses.replace(x, values=jax.numpy.asarray(mine))
    across.append(x)
  across = jax.tree_util.tree_unflatten(treedef, across)
  ref = fn(host, tokens)

  def error(q):
    return float(np.mean((np.asarray(jax.jit(sq.quantized(fn))(q, tokens)) - ref) ** 2))

  e_one, e_across, e_rtn = error(one), error(across), error(rtn)
  print(
    f"plain scan: codes equal {equal / total:.4f}; logits error rtn {e_rtn:.4g} "
    f"one {e_one:.4g} across {e_across:.4g}"
  )
  assert total > 0 and equal / total > 0.9
  assert e_across < 0.9 * e_rtn and e_one < 0.9 * e_rtn
  assert abs(e_across - e_one) < 0.02 * e_one


def test_one_run_across_processes(run, tmp_path):
  """Everything the two processes computed in one run, checked here (one test, so that
  one pytest worker starts the processes while the other goes on with other tests)."""
  _per_tensor_int8_matches_the_rust_oracle(run)
  for scheme in case.SCHEMES:
    _quantize_equals_one_process(run, scheme)
  _each_process_holds_only_its_shards(run)
  _sharded_forward_equals_one_process_bit_for_bit(run)
  _saved_restores_on_other_meshes(run, (1, 8), case.spec_for)
  _saved_restores_on_other_meshes(run, (4, 2), None)  # transposed
  _gptq_with_batches_on_each_process_equals_one_process_on_all(run)
  _awq_smoothquant_calibrate_with_batches_on_each_process(run)
  _auto_policy_chooses_as_one_process(run)
  _report_with_batches_on_each_process(run)
  _streaming_writes_the_one_process_checkpoint(run, tmp_path)
  _other_styles_equal_one_process(run)
  _gptq_on_a_scanned_plain_function(run)


def test_tuned_choices_are_process_0s_on_every_process(tmp_path):
  """With measuring on and each process timing its own way, every process takes process
  0's choices, so that they compile one program (mismatched ones crash on collectives)."""
  code = distributed.launch(
    [WORKER, "tuning", str(tmp_path), str(tmp_path / "unused")],
    case.PROCESSES,
    devices=4,
    timeout_s=180,  # 15 s here; processes that chose apart hang on their collectives
    grace_s=30,
    env={**ONE_THREAD, "SENSORQUANT_TUNING": "1"},
  )
  assert code == 0, "the worker processes failed (their output is above)"
  got = [json.loads((tmp_path / f"tuning_{i}.json").read_text()) for i in range(2)]
  assert got[0]["fake"] == got[1]["fake"] == "a"  # process 1 on its own would take "b"
  assert got[0]["choices"] and got[0]["choices"] == got[1]["choices"]
  mesh = _this_mesh()
  params = case.place(case.float_params(), mesh)
  q = sq.quantize(params, case.SCHEMES[0])
  want = jax.jit(lambda q, t: sq.apply(case.model(), q, t, mode="w8a8"))(q, case.tokens())
  np.testing.assert_allclose(np.asarray(got[0]["forward"]), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_killed_process_during_save_leaves_the_old_checkpoint(tmp_path):
  port = distributed.free_port()
  dest = tmp_path / "ckpt"
  logs = [open(tmp_path / f"log_{i}", "w+") for i in range(case.PROCESSES)]
  procs = [
    subprocess.Popen(
      [sys.executable, WORKER, "crash", str(tmp_path), str(dest)],
      env=_env(i, port),
      stdout=logs[i],
      stderr=subprocess.STDOUT,
    )
    for i in range(case.PROCESSES)
  ]
  try:
    assert procs[1].wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    code = procs[0].wait(timeout=90)
    ended = time.time()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  killed_at = float((tmp_path / "killed_at").read_text())
  assert code != 0 and ended - killed_at < 60
  logs[0].seek(0)
  log = logs[0].read()
  for f in logs:
    f.close()
  # The survivor names the process that died.
  assert re.search(r"stopped sending heartbeats\):\s*1\b", log), log[-3000:]
  # The first checkpoint is intact, and the interrupted save left only a partial copy aside.
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".ckpt")]
  assert len(leftovers) == 1, leftovers
  back = sq.restore(dest)
  chex.assert_trees_all_equal(back, sq.quantize(case.big_params(0), sq.PER_TENSOR))
  # The next save reports the interrupted one and removes what it left.
  with pytest.warns(UserWarning, match="an earlier save here was interrupted"):
    sq.save(dest, {"w": np.ones((4, 4), np.float32)}, overwrite=True)
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".ckpt")]


def _streaming_writes_the_one_process_checkpoint(run, tmp_path):
  out, _ = run
  src = str(out / "src.safetensors")
  one = tmp_path / "one"
  sq.stream.quantize_file(src, one)
  chex.assert_trees_all_equal(sq.restore(out / "streamed"), sq.restore(one))


def test_cli_processes_splits_a_checkpoint(tmp_path):
  src = str(tmp_path / "src.safetensors")
  case.write_source(src)
  dest = tmp_path / "q"
  cmd = [sys.executable, "-m", "sensorquant_jax", "quantize", src, "--out", str(dest)]
  cmd += ["--scheme", sq.PER_TENSOR]
  done = subprocess.run(
    [*cmd, "--processes", "2"], capture_output=True, text=True, timeout=TIMEOUT_S
  )
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  summary = "3 of 4 leaves quantized by 2 processes: 793.6 kB -> 199.2 kB; saved to " + str(dest)
  assert lines.count(summary) == 1  # process 0 speaks for both
  assert not [line for line in lines if "Gloo" in line or "peer ranks" in line], lines
  sq.stream.quantize_file(src, tmp_path / "one")
  chex.assert_trees_all_equal(sq.restore(dest), sq.restore(tmp_path / "one"))
  # Refused before any process starts: one line, exit status 2.
  again = subprocess.run(
    [*cmd, "--processes", "2"], capture_output=True, text=True, timeout=TIMEOUT_S
  )
  assert again.returncode == 2
  assert again.stderr.strip().splitlines() == [
    f"sensorquant: error: {dest}: a checkpoint already exists there; pass --overwrite to replace it"
  ]


@pytest.mark.parametrize(
  "line, noise",
  [
    (
      b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks "
      b"is : 1\n",
      True,
    ),
    (
      b"[Gloo] Rank [Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected "
      b"peer ranks is : 1\n",
      True,
    ),  # two threads' pieces, interleaved
    (b" peer ranks. Expected number of connected peer ranks is : 1\n", True),
    (b"[Gloo] Rank 1 is connected to 1\n", True),
    (b"3 of 4 leaves quantized by 2 processes: 793.6 kB -> 199.2 kB; saved to q\n", False),
    (b"connected to 2 peer ranks: our own words\n", False),
    (b"\n", False),
    (b"1\n", False),  # a number of ours
  ],
)
def test_launch_leaves_out_only_gloos_notices(line, noise):
  assert distributed._is_gloo_notice(line) is noise


def test_launch_leaves_out_a_count_split_off_a_notice():
  notice = b"[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer "
  assert distributed._is_gloo_notice(notice + b"ranks is : \n")  # its count on the next line
  assert distributed._is_gloo_notice(b"1\n", after_notice=True)
  assert not distributed._is_gloo_notice(b"4 of 4 leaves quantized\n", after_notice=True)
  assert not distributed._is_gloo_notice(b"\n", after_notice=True)
