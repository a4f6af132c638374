"""The measured dispatcher: choices by timing, the disk cache, the no-tuning switch, sq.tune."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sensorquant_jax as sq
from sensorquant_jax._src import native, ops, tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tuned(tmp_path, monkeypatch):
  """Timing on, a fresh cache folder (with this machine's built kernels, so
  nothing is compiled again), nothing remembered in memory."""
  native.ffi_targets()
  for f in native.cache_dir().glob("libsensorquant-*.so"):
    shutil.copy(f, tmp_path / f.name)
  monkeypatch.setenv("SENSORQUANT_CACHE", str(tmp_path))
  monkeypatch.setenv(tuning.ENV, "1")
  tuning.clear_memory()
  yield tmp_path
  tuning.clear_memory()


@pytest.fixture
def timings(monkeypatch):
  """Replaces timing with given seconds per candidate; records each measurement."""
  calls = []
  fake = {}

  def measure(candidates, example):
    args = example(0)
    assert all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(args))
    calls.append(sorted(candidates))
    return {name: fake.get(name, 1.0) for name in candidates}

  monkeypatch.setattr(tuning, "measure", measure)
  return fake, calls


def _kernel(k=256, n=512, scheme=sq.PER_CHANNEL, seed=0):
  w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
  return sq.quantize_array(w, scheme)


def test_rows_bucket():
  assert [tuning.rows_bucket(r) for r in (0, 1, 2, 3, 4, 5, 16, 17, 300)] == [
    1,
    1,
    2,
    4,
    4,
    8,
    16,
    32,
    512,
  ]


@pytest.mark.parametrize("mode", sq.MODES)
def test_auto_runs_the_fastest_measured_candidate(tuned, timings, mode):
  fake, calls = timings
  qk = _kernel()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 256)), jnp.float32)
  names = list(
    ops._weight_only_candidates(ops.as_matrix(qk, 1), 512, 3)
    if mode == "weight_only"
    else ops._w8a8_candidates(ops.as_matrix(qk, 1), 256, 3)
  )
  ref = sq.dense(x, qk, mode=mode, impl="xla")
  for slowest_first in (names, names[::-1]):
    tuning.clear_memory()
    for f in os.listdir(tuned):
      if f.startswith("tuning-"):
        os.unlink(tuned / f)
    fake.clear()
    fake.update({name: float(i + 1) for i, name in enumerate(slowest_first[::-1])})
    choices = sq.tune(qk, batch_sizes=(3,), modes=(mode,))
    (key,) = [k for k in choices if k.startswith(mode) and "256x512" in k]
    assert choices[key] == slowest_first[-1] if len(names) > 1 else names[0]
    got = jax.jit(lambda x: sq.dense(x, qk, mode=mode))(x)  # the cached choice runs
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
  assert len(calls) == (2 if len(names) > 1 else 0)


def test_measuring_real_candidates_writes_one_atomic_file(tuned):
  qk = _kernel(128, 1024)
  x = jnp.ones((2, 128), jnp.float32)
  y = jax.jit(lambda x: sq.dense(x, qk))(x)
  np.testing.assert_allclose(
    np.asarray(y), np.asarray(sq.dense(x, qk, impl="xla")), rtol=1e-5, atol=1e-4
  )
  files = [f for f in os.listdir(tuned) if not f.startswith("libsensorquant")]
  tuning_files = [f for f in files if f.startswith("tuning-")]
  assert len(tuning_files) == 1 and not [f for f in files if ".tmp" in f]
  data = json.loads((tuned / tuning_files[0]).read_text())
  assert data["format"] == tuning.FORMAT and data["machine"]["jax"] == jax.__version__
  (entry,) = [v for k, v in data["choices"].items() if "128x1024 rows=2" in k]
  names = list(ops._weight_only_candidates(ops.as_matrix(qk, 1), 512, 2))
  assert entry["impl"] in names and set(entry["seconds"]) == set(names)
  assert all(t is None or t > 0 for t in entry["seconds"].values())


def test_choices_are_reused_from_memory_and_file(tuned, timings):
  _, calls = timings
  qk = _kernel()
  first = sq.tune(qk, batch_sizes=(1, 16))
  n = len(calls)
  assert sq.tune(qk, batch_sizes=(1, 16)) == first and len(calls) == n  # memory
  tuning.clear_memory()
  assert sq.tune(qk, batch_sizes=(1, 16)) == first and len(calls) == n  # the file


def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(tuned, timings):
  _, calls = timings
  path = tuning.cache_path()
  for bad in (b"\x00garbage{", b'{"format": 1, "choices": {"k": 3}}', b"[]"):
    tuning.clear_memory()
    path.write_bytes(bad)
    with pytest.warns(sq.TuningCacheWarning, match="ignoring the tuning cache"):
      choices = sq.tune(_kernel(), batch_sizes=(1,))
    data = json.loads(path.read_text())
    assert {k: v["impl"] for k, v in data["choices"].items()} == choices


def test_an_unwritable_cache_warns_and_keeps_the_choice(tuned, timings, monkeypatch):
  def fail(*args, **kwargs):
    raise OSError(28, "No space left on device", "x")

  monkeypatch.setattr(tuning.fileio, "write_file_atomic", fail)
  with pytest.warns(sq.TuningCacheWarning, match="could not write"):
    choices = sq.tune(_kernel(), batch_sizes=(1,))
  assert not tuning.cache_path().exists()
  _, calls = timings
  n = len(calls)
  assert sq.tune(_kernel(), batch_sizes=(1,)) == choices and len(calls) == n


def test_a_failing_candidate_is_never_chosen(tuned):
  def boom(x):
    raise RuntimeError("does not run here")

  seconds = tuning.measure({"fails": boom, "works": lambda x: x * 2}, lambda s: (jnp.ones(4),))
  assert seconds["fails"] == float("inf") and 0 < seconds["works"] < 1
  problem = tuning.Problem("weight_only", "int8", 4, 4, 1, "float32")
  name = tuning.choose(problem, {"fails": boom, "works": lambda x: x * 2}, lambda s: (jnp.ones(4),))
  assert name == "works"
  (entry,) = json.loads(tuning.cache_path().read_text())["choices"].values()
  assert entry["seconds"]["fails"] is None


def test_candidates_are_timed_in_interleaved_rounds(monkeypatch):
  """A machine slow for a while (the first four calls here) slows every candidate
  alike: timed one after the other, "a" would take the whole slow spell and lose."""
  calls: list[str] = []

  def fake_timed(run, copies):
    name = "a" if float(run(copies)[0][0]) == 1 else "b"
    calls.append(name)
    slow = len(calls) <= 4
    return 10.0 if slow else {"a": 1.0, "b": 1.1}[name]

  monkeypatch.setattr(tuning, "_timed", fake_timed)
  seconds = tuning.measure({"a": lambda x: x * 1, "b": lambda x: x * 2}, lambda s: (jnp.ones(4),))
  assert seconds == {"a": 1.0, "b": 1.1}
  assert calls[:4] == ["a", "b", "b", "a"] and len(calls) == 2 * tuning.REPEATS


def test_timed_calls_run_one_after_the_other():
  """Each timed call depends on the previous one's output (so XLA cannot run them side by
  side on part of the cores each): a NaN from the first call reaches the second."""
  first = (jnp.zeros(3), jnp.arange(3, dtype=jnp.int32))
  second = (jnp.ones(3), jnp.arange(3, dtype=jnp.int32))
  out = jax.jit(lambda a: tuning._in_sequence(lambda x, i: x / x[0] + i, a))([first, second])
  assert np.isnan(np.asarray(out[0])).all()
  assert np.isnan(np.asarray(out[1])).all()
  # without a NaN upstream the values are the calls' own
  out = jax.jit(lambda a: tuning._in_sequence(lambda x, i: x * 2 + i, a))([second, second])
  np.testing.assert_array_equal(np.asarray(out[1]), [2, 3, 4])


def test_no_tuning_switch_is_deterministic(tmp_path, monkeypatch):
  monkeypatch.setenv("SENSORQUANT_CACHE", str(tmp_path))
  monkeypatch.setenv(tuning.ENV, "0")
  tuning.clear_memory()

  def never(*args):
    raise AssertionError("measured with tuning off")

  monkeypatch.setattr(tuning, "measure", never)
  qk = _kernel()
  choices = sq.tune(qk, batch_sizes=(1, 64), modes=sq.MODES)
  m = ops.as_matrix(qk, 1)
  for key, name in choices.items():
    rows = int(key.split("rows=")[1].split()[0])
    fallback = (
      ops._weight_only_candidates(m, 512, rows)
      if key.startswith("weight_only")
      else ops._w8a8_candidates(m, 256, rows)
    )
    assert name == next(iter(fallback))
  assert not os.listdir(tmp_path) or not any(f.startswith("tuning-") for f in os.listdir(tmp_path))
  assert sq.tune(qk, batch_sizes=(1, 64), modes=sq.MODES) == choices


def test_tune_covers_dense_general_kernels_and_nnx_modules(tuned, timings):
  rng = np.random.default_rng(0)
  tree = {
    "attn": {"out": {"kernel": sq.quantize_array(rng.standard_normal((4, 8, 32)), sq.PER_CHANNEL)}},
    "bias": np.zeros(3, np.float32),
  }
  keys = sq.tune(tree, batch_sizes=(2, 3))
  assert {k.split()[2] for k in keys} == {"4x256", "32x32"}  # n_in = 1 and n_in = 2
  assert {k.split()[3] for k in keys} == {"rows=2", "rows=4"}
  model = sq.nnx.quantize(nnx.Sequential(nnx.Linear(64, 48, rngs=nnx.Rngs(0))), min_size=0)
  assert [k.split()[2] for k in sq.tune(model)] == ["64x48"]


def test_choices_are_reused_across_processes(tuned):
  script = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import sensorquant_jax as sq
    from sensorquant_jax._src import tuning
    if sys.argv[1] == "second":
      def never(*a):
        raise SystemExit("measured again")
      tuning.measure = never
    w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    print(json.dumps(sq.tune(sq.quantize_array(w, sq.PER_CHANNEL), batch_sizes=(4,))))
    """
  )
  env = dict(os.environ, SENSORQUANT_CACHE=str(tuned), SENSORQUANT_TUNING="1", PYTHONPATH=ROOT)
  out = []
  for which in ("first", "second"):
    proc = subprocess.run(
      [sys.executable, "-c", script, which], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert out[0] == out[1] and len(out[0]) == 1


def test_cache_lives_next_to_the_native_build_cache(tuned):
  assert tuning.cache_path().parent == native.cache_dir() == tuned
  machine = tuning._machine()
  assert machine["backend"] == jax.default_backend() and machine["jaxlib"]
  assert sq.__version__ == machine["sensorquant_jax"]
