"""Several processes, one model: joining ``jax.distributed`` and starting local processes.

The library itself needs nothing beyond ``jax.distributed.initialize()``: its
functions take global ``jax.Array`` s that span processes and every process
calls them with the same arguments (each with its own calibration batches).
This module is what the command line uses to start and join such processes:
:func:`initialize` joins from the environment (``SENSORQUANT_COORDINATOR``,
``SENSORQUANT_NUM_PROCESSES``, ``SENSORQUANT_PROCESS_ID``, or JAX's own
cluster detection on TPU pods, SLURM and Open MPI), and :func:`launch` starts
N local processes on this machine with CPU collectives.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from sensorquant_jax._src import fileio

COORDINATOR = "SENSORQUANT_COORDINATOR"
NUM_PROCESSES = "SENSORQUANT_NUM_PROCESSES"
PROCESS_ID = "SENSORQUANT_PROCESS_ID"
HEARTBEAT_S = 20
"""Seconds without a heartbeat after which a process counts as dead: the
others then stop with an error rather than waiting on it forever."""


class DistributedError(RuntimeError):
  """Processes could not be started or joined, or one of them failed."""


def _env_int(name: str) -> int:
  text = os.environ[name]
  try:
    return int(text)
  except ValueError:
    raise DistributedError(f"{name}={text!r} is not an integer") from None


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  heartbeat_s: int = HEARTBEAT_S,
) -> None:
  """Joins this process to the others with ``jax.distributed.initialize``.

  Arguments not given are read from ``SENSORQUANT_COORDINATOR`` (``host:port``),
  ``SENSORQUANT_NUM_PROCESSES`` and ``SENSORQUANT_PROCESS_ID``; where those
  are unset too, JAX detects the cluster itself (Cloud TPU, SLURM, Open MPI,
  Kubernetes). On CPU, collectives go over gloo. A no-op once joined.

  Args:
    coordinator: ``host:port`` of process 0's coordination service.
    num_processes: how many processes take part.
    process_id: this process's index, from 0.
    heartbeat_s: seconds of silence after which a process counts as dead (the
      others then exit with an error instead of hanging).

  Raises:
    DistributedError: malformed environment values or a failed join.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator is None and COORDINATOR in os.environ:
    coordinator = os.environ[COORDINATOR]
  if num_processes is None and NUM_PROCESSES in os.environ:
    num_processes = _env_int(NUM_PROCESSES)
  if process_id is None and PROCESS_ID in os.environ:
    process_id = _env_int(PROCESS_ID)
  # Must be set before the CPU backend starts; it has no effect on GPU/TPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator,
      num_processes,
      process_id,
      heartbeat_timeout_seconds=heartbeat_s,
      initialization_timeout=120,
    )
  except Exception as e:  # JAX raises RuntimeError or XlaRuntimeError
    raise DistributedError(f"cannot join the other processes: {fileio.first_line(e)}") from None


def free_port() -> int:
  """A TCP port on localhost that nothing listens on (for a local coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


def launch(
  argv: Sequence[str],
  processes: int,
  *,
  devices: int | None = None,
  timeout_s: float | None = None,
  grace_s: float = 60.0,
  env: Mapping[str, str] | None = None,
) -> int:
  """Runs ``python argv...`` in ``processes`` local processes joined by ``jax.distributed``.

  Each child finds its coordinator, count and index in its environment (read
  by :func:`initialize`). Their stdout is passed on a line at a time (without
  gloo's connection notices), their stderr as it is. When one exits with an
  error or is killed, the others get ``grace_s`` seconds to notice and exit
  themselves, then are killed; a line on stderr names every process that
  failed and how.

  Args:
    argv: the arguments after ``python`` (e.g. ``["-m", "sensorquant_jax", ...]``).
    processes: how many processes.
    devices: CPU devices per process (``--xla_force_host_platform_device_count``).
    timeout_s: kill every process after this many seconds.
    grace_s: how long the others may take to exit after one failed.
    env: extra environment variables for every process.

  Returns:
    0 when every process succeeded, else the first failure's exit code
    (``128 + signal`` for a process killed by a signal).
  """
  if processes < 1:
    raise DistributedError(f"the number of processes must be at least 1, got {processes}")
  base = dict(os.environ)
  base.update(env or {})
  base[COORDINATOR] = f"127.0.0.1:{free_port()}"
  base[NUM_PROCESSES] = str(processes)
  if devices is not None:
    flags = base.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    base["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
  children, relays = [], []
  for i in range(processes):
    child_env = dict(base)
    child_env[PROCESS_ID] = str(i)
    child = subprocess.Popen([sys.executable, *argv], env=child_env, stdout=subprocess.PIPE)
    children.append(child)
    relays.append(threading.Thread(target=_relay, args=(child.stdout,), daemon=True))
    relays[-1].start()
  start = time.monotonic()
  failed: dict[int, int] = {}
  first_failure = None
  try:
    while True:
      codes = [c.poll() for c in children]
      for i, code in enumerate(codes):
        if code not in (None, 0) and i not in failed:
          failed[i] = code
          if first_failure is None:
            first_failure = time.monotonic()
      if all(code is not None for code in codes):
        break
      now = time.monotonic()
      if first_failure is not None and now - first_failure > grace_s:
        break
      if timeout_s is not None and now - start > timeout_s:
        print(f"sensorquant: processes still running after {timeout_s:.0f} s", file=sys.stderr)
        failed.setdefault(-1, 124)
        break
      time.sleep(0.05)
  finally:
    for i, c in enumerate(children):
      if c.poll() is None:
        c.kill()
        c.wait()
        failed.setdefault(i, -signal.SIGKILL)
  for relay in relays:
    relay.join(timeout=5)
  real = {i: code for i, code in failed.items() if i >= 0}
  if real:
    print(
      "sensorquant: " + "; ".join(f"process {i} {_how(code)}" for i, code in sorted(real.items())),
      file=sys.stderr,
    )
  if not failed:
    return 0
  code = next(iter(failed.values()))
  return 128 - code if code < 0 else code


def _relay(stream: Any) -> None:
  """Copies a child's stdout to ours a whole line at a time (the children's lines never
  interleave mid-line), leaving out gloo's connection notices."""
  out = getattr(sys.stdout, "buffer", None)
  after_notice = False
  for line in iter(stream.readline, b""):
    if _is_gloo_notice(line, after_notice):
      after_notice = True
      continue
    after_notice = False
    if out is not None:
      out.write(line)
      out.flush()
    else:
      sys.stdout.write(line.decode(errors="replace"))
  stream.close()


_GLOO_WORDS = re.compile(
  rb"\[Gloo\]|Rank|is connected to|Expected number of connected|peer ranks|is :|[\d\s.:]"
)


def _is_gloo_notice(line: bytes, after_notice: bool = False) -> bool:
  """Whether ``line`` is (a piece of) gloo's "[Gloo] Rank 0 is connected to 1 peer ranks.
  Expected number of connected peer ranks is : 1", which its threads write in pieces
  that interleave mid-line: a line of its words only, or, right after a notice, of its
  numbers only (a count split off on a line of its own)."""
  if _GLOO_WORDS.sub(b"", line) or not line.strip():
    return False
  return after_notice or b"connected" in line or b"Gloo" in line or b"peer ranks" in line


def _how(code: int) -> str:
  if code < 0:
    try:
      name = signal.Signals(-code).name
    except ValueError:
      name = f"signal {-code}"
    return f"was killed by {name}"
  return f"exited with status {code}"


def process_local_batch(batch: Any, like: Any = None) -> Any:
  """One global batch from each process's own rows (axis 0), for calibration.

  Every array leaf of ``batch`` becomes a global array whose axis 0 is the
  processes' rows in process order, each process's rows held by its own
  devices; non-array leaves pass through. In one process, ``batch`` is
  returned as it is.

  Args:
    batch: this process's batch (a pytree; the same shapes on every process).
    like: the params the batch meets (any pytree): the batch goes on their mesh
      (one program has one mesh), split along the mesh axes that separate the
      processes; without one, or when no such axes exist, on
      :func:`processes_mesh`.

  Returns:
    The global batch.
  """
  if jax.process_count() == 1:
    return batch
  sharding = batch_sharding(like)

  def one(x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or not np.ndim(x):
      return x
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already global
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree_util.tree_map(one, batch)


def batch_sharding(like: Any = None) -> jax.sharding.NamedSharding:
  """How a global batch is laid out: rows split by process, on ``like``'s mesh if it has
  axes that separate the processes (see :func:`process_local_batch`)."""
  for x in jax.tree_util.tree_leaves(like):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and not x.is_fully_addressable:
      mesh = sharding.mesh
      found = _by_process(mesh) if isinstance(mesh, jax.sharding.Mesh) else None
      if found is not None:
        return found
      break
  mesh = processes_mesh()
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("processes"))


def _by_process(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding | None:
  """A sharding of ``mesh`` giving process p exactly block p of axis 0, if one exists."""
  names = list(mesh.axis_names)
  for group in [(n,) for n in names] + [tuple(names)]:
    spec = jax.sharding.PartitionSpec(group if len(group) > 1 else group[0])
    sharding = jax.sharding.NamedSharding(mesh, spec)
    blocks = sharding.devices_indices_map((jax.process_count(),))
    if all(
      index[0].indices(jax.process_count())[:2] == (p, p + 1)
      for d, index in blocks.items()
      for p in [getattr(d, "process_index", 0)]
    ):
      return sharding
  return None


def processes_mesh(devices_per_process: int | None = None) -> jax.sharding.Mesh:
  """A ``("processes", "devices")`` mesh: one row per process, of its devices.

  Args:
    devices_per_process: how many of each process's devices (its first ones);
      ``None`` for all. With 1, an array split along ``"processes"`` is held
      once per process rather than once per device.
  """
  rows = []
  for p in range(jax.process_count()):
    mine = sorted(jax.local_devices(process_index=p), key=lambda d: d.id)
    rows.append(mine[:devices_per_process] if devices_per_process else mine)
  return jax.sharding.Mesh(np.array(rows, dtype=object), ("processes", "devices"))


def is_multiprocess() -> bool:
  """Whether more than one process takes part (``jax.distributed`` joined)."""
  return jax.process_count() > 1


def agree(fn: Any, errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> Any:
  """Runs ``fn()`` on process 0 only and gives every process its result.

  For the file-system steps of a save (checks, temporary folders, the final
  swap) that one process must take for all: the others wait for it, and an
  error of a type in ``errors`` raised there is raised on every process, with
  the same type and message. In one process it simply calls ``fn()``.

  Args:
    fn: a zero-argument callable returning a JSON-able value.
    errors: exception types passed on to the other processes.

  Returns:
    ``fn()``'s value, on every process.
  """
  if not is_multiprocess():
    return fn()
  import json

  from jax.experimental import multihost_utils

  if jax.process_index() == 0:
    try:
      message = {"value": fn()}
    except Exception as e:  # every failure reaches the others, who wait on this broadcast
      message = {"error": type(e).__name__, "module": type(e).__module__, "text": str(e)}
      failure: BaseException | None = e
    else:
      failure = None
    data = np.frombuffer(json.dumps(message).encode(), np.uint8)
  else:
    data, failure = np.zeros(0, np.uint8), None
  n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
  buf = data if data.size == n else np.zeros(n, np.uint8)
  got = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
  if failure is not None:
    raise failure
  message = json.loads(got.tobytes().decode())
  if "error" in message:
    raise _error_type(message["module"], message["error"], errors)(message["text"])
  return message["value"]


def _error_type(module: str, name: str, errors: tuple[type[BaseException], ...]) -> type:
  """The exception class process 0 raised (one of ``errors`` or a subclass), by name."""
  import importlib

  try:
    kind = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError):
    kind = None
  if isinstance(kind, type) and issubclass(kind, errors):
    return kind
  return DistributedError


def to_host(x: Any) -> np.ndarray:
  """``x`` whole as a numpy array on every process (gathered when it spans processes)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
