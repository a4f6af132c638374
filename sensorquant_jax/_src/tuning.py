"""Choosing an op's implementation by timing the candidates on the running machine.

``impl="auto"`` asks :func:`choose` which implementation runs a
:class:`Problem` (mode, weight format, shape, row bucket, activation dtype).
The first time a problem is met on a machine, every candidate is compiled and
timed on random data of the problem's shapes (at trace time, or ahead of time
with :func:`tune`), and the fastest is remembered in memory and in a JSON file
next to the native build cache (``$SENSORQUANT_CACHE``), one file per machine
(backend, device kind or CPU model and flags), jax/jaxlib version and version
of our kernels. Later processes read the file and never time again; a corrupt
file is ignored with a warning and replaced on the next write.

In a multi-process run (``jax.distributed``) every process takes process 0's choice,
so that all of them compile one program the same way.

``SENSORQUANT_TUNING=0`` switches measuring (and the file) off: every problem
then gets its shipped fallback, the first candidate its op lists, which makes
``impl="auto"`` deterministic. The test suite runs that way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from sensorquant_jax._src import fileio, native

ENV = "SENSORQUANT_TUNING"
"""Environment switch: ``0`` turns measuring off (the shipped fallbacks only)."""
FORMAT = 1
"""Version of the cache file's layout."""
WORKING_SET = 64 << 20
"""Bytes of distinct weights each timed call streams (copies of the problem's
inputs up to this size), so layers that fit in cache are not timed from cache."""
MAX_COPIES = 8
REPEATS = 6
"""Timed calls per candidate (at least two, fewer when a call is slow)."""
SECONDS = 0.5
"""A candidate's timed calls stop after this long."""

AGREE_TIMEOUT_MS = 600_000
"""How long a process waits for process 0's choice (process 0 may be timing)."""

_LOCK = threading.RLock()
_PUBLISHED: dict[str, str] = {}  # process 0: the choices it published (multi-process runs)
_MEMORY: dict[str, dict[str, Any]] = {}  # file name -> {problem key: entry}
_RECORD = threading.local()  # .choices: {problem key: name} while tune() traces


class TuningCacheWarning(UserWarning):
  """The tuning cache file could not be read (it is ignored) or written."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """What an implementation choice depends on, besides the machine.

  Attributes:
    mode: ``"weight_only"`` or ``"w8a8"``.
    weights: the stored format, e.g. ``"int8"``, ``"int8/tiled"``,
      ``"int8/block128/zero"``, ``"int4/block128"``.
    k, n: the kernel seen as ``[K, N]``.
    rows: the activation rows, rounded up to a power of two.
    dtype: the activation dtype's name.
  """

  mode: str
  weights: str
  k: int
  n: int
  rows: int
  dtype: str

  @property
  def key(self) -> str:
    return f"{self.mode} {self.weights} {self.k}x{self.n} rows={self.rows} {self.dtype}"


def rows_bucket(rows: int) -> int:
  """``rows`` rounded up to a power of two: the row counts timed and cached."""
  return 1 << max(0, math.ceil(math.log2(max(rows, 1))))


def enabled() -> bool:
  """Whether ``impl="auto"`` measures (``SENSORQUANT_TUNING`` is not ``0``)."""
  return os.environ.get(ENV, "1") != "0"


@functools.cache
def _machine() -> dict[str, str]:
  """What the choices depend on besides the problem (read once per process)."""
  dev = jax.devices()[0]
  here = Path(__file__).parent
  kernels = hashlib.sha256()
  for src in (here / "ops.py", here / "pallas.py", here.parent / "csrc" / "dense.cc"):
    kernels.update(src.read_bytes())
  import sensorquant_jax  # the package's version (this module is imported by it lazily)

  return {
    "backend": dev.platform,
    "device": dev.device_kind,
    "cpu": hashlib.sha256(native.cpu_signature().encode()).hexdigest()[:16],
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "sensorquant_jax": sensorquant_jax.__version__,
    "kernels": kernels.hexdigest()[:16],
  }


def cache_path() -> Path:
  """This machine's tuning file (under the native build cache folder)."""
  machine = _machine()
  digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
  return native.cache_dir() / f"tuning-{machine['backend']}-{digest}.json"


def _read(path: Path) -> dict[str, Any]:
  """The file's choices; ``{}`` (with a warning) when it is unreadable or malformed."""
  try:
    with open(path, "rb") as f:
      data = json.loads(f.read(1 << 24))
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    warnings.warn(f"ignoring the tuning cache {path}: {e}", TuningCacheWarning, stacklevel=4)
    return {}
  choices = data.get("choices") if isinstance(data, dict) else None
  if (
    not isinstance(data, dict)
    or data.get("format") != FORMAT
    or not isinstance(choices, dict)
    or not all(isinstance(v, dict) and isinstance(v.get("impl"), str) for v in choices.values())
  ):
    warnings.warn(
      f"ignoring the tuning cache {path}: not a format-{FORMAT} tuning file",
      TuningCacheWarning,
      stacklevel=4,
    )
    return {}
  return choices


def _entries(path: Path) -> dict[str, Any]:
  if path.name not in _MEMORY:
    _MEMORY[path.name] = _read(path)
  return _MEMORY[path.name]


def _store(path: Path, key: str, entry: dict[str, Any]) -> None:
  """Adds one choice to memory and to the file (merged with other processes' entries)."""
  _entries(path)[key] = entry
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with native.file_lock(path.parent / ".lock"):
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", TuningCacheWarning)  # already said, or rewritten now
        merged = {**_read(path), **_MEMORY[path.name]}
      text = json.dumps(
        {"format": FORMAT, "machine": _machine(), "choices": merged}, indent=1, sort_keys=True
      )
      fileio.write_file_atomic(str(path), lambda f: f.write(text.encode()), fsync=False)
    _MEMORY[path.name] = merged
  except OSError as e:
    warnings.warn(f"could not write the tuning cache {path}: {e}", TuningCacheWarning, stacklevel=4)


def _random_like(x: Any, seed: int) -> Any:
  rng = np.random.default_rng(seed)
  dtype = np.dtype(x.dtype)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    lo, hi = max(info.min, -16), min(info.max, 16)
    return jnp.asarray(rng.integers(lo, hi, x.shape, endpoint=True).astype(dtype))
  return jnp.asarray(rng.uniform(0.5, 1.0, x.shape).astype(np.float32)).astype(dtype)


def _timed(run: Callable, copies: list[tuple]) -> float:
  """Seconds per call of one pass of ``run`` over the copies."""
  t = time.perf_counter()
  jax.block_until_ready(run(copies))
  return (time.perf_counter() - t) / len(copies)


def _in_sequence(fn: Callable, all_args: list[tuple]) -> list[Any]:
  """``fn`` on each copy of the arguments, each call after the previous one.

  Independent calls in one program may run at the same time on XLA's CPU thread
  pool, each on part of the cores, which times something a model (whose layers
  wait for each other) never runs; a dependence on the previous output (one
  element, times zero) keeps them in order.
  """
  outs: list[Any] = []
  for args in all_args:
    if outs:
      args = _after(args, outs[-1])
    outs.append(fn(*args))
  return outs


def _after(args: tuple, previous: Any) -> tuple:
  """``args`` with its first floating-point leaf made to depend on ``previous``."""
  dep = next(
    (x for x in jax.tree_util.tree_leaves(previous) if jnp.issubdtype(x.dtype, jnp.floating)),
    None,
  )
  if dep is None:
    return args
  leaves, treedef = jax.tree_util.tree_flatten(args)
  for i, x in enumerate(leaves):
    if jnp.issubdtype(x.dtype, jnp.floating):
      leaves[i] = x + (dep.ravel()[0] * 0).astype(x.dtype)
      break
  return jax.tree_util.tree_unflatten(treedef, leaves)


def measure(
  candidates: Mapping[str, Callable], example: Callable[[int], tuple]
) -> dict[str, float]:
  """Seconds per call of each candidate (``inf`` where it fails to run).

  Every candidate is compiled and run once, then timed in rounds, one call of
  each per round in a rotating order, and each gets the median of its rounds:
  a machine that slows down for a while (a shared or throttled CPU) slows every
  candidate alike, where timing them one after the other would charge it to
  whichever ran then.

  Args:
    candidates: name -> function of the example's arguments.
    example: ``seed -> arguments`` (concrete arrays; the same shapes for every seed).
  """
  with jax.ensure_compile_time_eval():  # run now, even while an outer jit traces
    first = example(0)
    nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(first))
    n_copies = max(1, min(MAX_COPIES, -(-WORKING_SET // max(nbytes, 1))))
    copies = [first] + [example(i) for i in range(1, n_copies)]
    runs: dict[str, Callable] = {}
    for name, fn in candidates.items():
      run = jax.jit(functools.partial(_in_sequence, fn))
      try:
        jax.block_until_ready(run(copies))  # compile and warm up
      except Exception:  # a candidate that cannot run here is not chosen
        continue
      runs[name] = run
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    start = time.perf_counter()
    rounds = 0
    # At least two rounds; more up to REPEATS while the budget (per candidate) lasts.
    while rounds < REPEATS and (
      rounds < 2 or time.perf_counter() - start < SECONDS * max(len(names), 1)
    ):
      for i in range(len(names)):
        name = names[(rounds + i) % len(names)]
        try:
          times[name].append(_timed(runs[name], copies))
        except Exception:
          times[name].append(math.inf)
      rounds += 1
    return {
      name: statistics.median(times[name]) if name in times else math.inf for name in candidates
    }


def example_like(*args: Any) -> Callable[[int], tuple]:
  """``seed -> arguments`` with the structure, shapes and dtypes of ``args``
  (tracers included) filled with small random values."""
  leaves, treedef = jax.tree_util.tree_flatten(args)
  structs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]

  def make(seed: int) -> tuple:
    filled = [_random_like(s, seed * 1000 + i) for i, s in enumerate(structs)]
    return jax.tree_util.tree_unflatten(treedef, filled)

  return make


@contextlib.contextmanager
def recording() -> Iterator[dict[str, str]]:
  """Collects ``{problem key: implementation}`` for the choices made inside the block.

  Nested blocks see their own choices; an outer block sees them too.
  """
  outer = getattr(_RECORD, "choices", None)
  inner: dict[str, str] = {}
  _RECORD.choices = inner
  try:
    yield inner
  finally:
    _RECORD.choices = outer
    if outer is not None:
      outer.update(inner)


def choose(
  problem: Problem,
  candidates: Mapping[str, Callable],
  example: Callable[[int], tuple],
) -> str:
  """The candidate to run for ``problem`` on this machine.

  Args:
    problem: what the choice depends on.
    candidates: name -> implementation, the shipped fallback first.
    example: ``seed -> arguments`` of the problem's shapes, for timing.

  Returns:
    A name from ``candidates``: the cached or measured fastest; the first when
    only one runs here or tuning is off.
  """
  name = _choose(problem, candidates, example)
  record = getattr(_RECORD, "choices", None)
  if record is not None:
    record[problem.key] = name
  return name


def _choose(problem: Problem, candidates: Mapping[str, Callable], example: Callable) -> str:
  names = list(candidates)
  if len(names) == 1 or not enabled():
    return names[0]
  return _agreed(problem, names, _fastest(problem, candidates, example))


def _agreed(problem: Problem, names: list[str], mine: str) -> str:
  """Process 0's choice in a multi-process run, ``mine`` otherwise.

  Each process times on its own (or reads its own host's cache), and timings differ:
  processes that traced one program into different implementations would run
  mismatched collectives. Choices are made while tracing, where no collective can
  run, so process 0 publishes each problem's choice once in the ``jax.distributed``
  coordinator's key-value store and the others wait for it there.
  """
  if jax.process_count() == 1:
    return mine
  from jax._src import distributed as jax_distributed  # the coordinator's client

  client = jax_distributed.global_state.client
  if client is None:
    return mine
  key = f"sensorquant_jax/tuning/{problem.key}"
  if jax.process_index() == 0:
    with _LOCK:
      if key not in _PUBLISHED:
        client.key_value_set(key, mine)
        _PUBLISHED[key] = mine
      published = _PUBLISHED[key]
    return published if published in names else mine
  try:
    theirs = client.blocking_key_value_get(key, AGREE_TIMEOUT_MS)
  except Exception as e:  # process 0 never traced this problem
    warnings.warn(
      f"impl='auto': process 0 chose nothing for {problem.key} ({e}); this process "
      f"runs its own choice {mine!r}",
      stacklevel=4,
    )
    return mine
  return theirs if theirs in names else names[0]


def _fastest(problem: Problem, candidates: Mapping[str, Callable], example: Callable) -> str:
  """The cached or measured fastest candidate on this process's machine."""
  names = list(candidates)
  with _LOCK:
    path = cache_path()
    hit = _entries(path).get(problem.key)
    if (
      hit is not None
      and hit.get("impl") in candidates
      and set(hit.get("seconds", ())) >= set(names)
    ):
      return hit["impl"]
    seconds = measure(candidates, example)
    best = min(names, key=lambda name: seconds[name])  # ties: the fallback's order
    _store(
      path,
      problem.key,
      {"impl": best, "seconds": {k: (v if math.isfinite(v) else None) for k, v in seconds.items()}},
    )
    return best


def clear_memory() -> None:
  """Forgets the in-memory choices (the file stays); the next lookup rereads it."""
  with _LOCK:
    _MEMORY.clear()
