"""Helper process for the crash and race tests of tests/test_fileio.py (not a test).

    python _crash_writer.py kill KIND DEST SNAPDIR TRIALS MAX_DELAY
    python _crash_writer.py race KIND DEST ROUNDS

It imports the package once and then forks a writer per trial; JAX's backend
is never initialised in this process, so forking is safe. ``kill``: each
forked writer overwrites DEST in a loop, alternating two contents, and is
killed with SIGKILL after a random delay; the state of DEST is then copied
to SNAPDIR/<trial> (or recorded as missing) for the test to check. ``race``:
two forked writers each save their own content ROUNDS times to DEST.
KIND is ``checkpoint``, ``manifest`` or ``calibration``. Prints one JSON line.
"""

import json
import os
import random
import shutil
import signal
import sys

import numpy as np
import orbax.checkpoint  # noqa: F401  (imported before forking, used by every writer)

import sensorquant_jax as sq
from sensorquant_jax import manifest as m

# The package resolves names lazily: resolve them here, once, before forking.
_ = (sq.save, sq.save_calibration, sq.restore, m.QuantizedModel, m.QuantizedWeights)


def contents(kind: str, which: int):
  """Two distinguishable payloads per kind (``which`` 0 or 1)."""
  rng = np.random.default_rng(which)
  if kind == "checkpoint":
    return {
      "w": rng.integers(-127, 128, (512, 512)).astype(np.float32),
      "tag": which,
    }
  if kind == "manifest":
    layers = [
      m.QuantizedWeights.from_f32(f"l{i}", rng.standard_normal(256 * 256), (256, 256))
      for i in range(4)
    ]
    total = sum(layer.size_bytes() for layer in layers)
    return m.QuantizedModel(json.dumps({"which": which}), layers, m.SCHEME, total, 4 * total)
  return {
    f"layer{i}": m.LayerCalibration(f"layer{i}", -1.0, 1.0, -float(which + i), float(which + i))
    for i in range(2000)
  }


def save(kind: str, dest: str, payload) -> None:
  if kind == "checkpoint":
    sq.save(dest, payload, overwrite=True)
  elif kind == "manifest":
    payload.save(dest, overwrite=True)
  else:
    sq.save_calibration(dest, payload, overwrite=True)


def _writer(kind: str, dest: str, loop: bool, rounds: int, which: int, ready: int = -1) -> None:
  payloads = [contents(kind, 0), contents(kind, 1)]
  if kind == "checkpoint":
    import jax

    jax.devices()  # initialise the backend before announcing readiness
  if ready >= 0:
    os.write(ready, b"r")
  k = which
  while loop or rounds > 0:
    save(kind, dest, payloads[k % 2] if loop else payloads[which])
    k += 1
    rounds -= 1
  os._exit(0)


def kill(kind, dest, snapdir, trials, max_delay):
  results = []
  for t in range(int(trials)):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
      os.close(r)
      _writer(kind, dest, True, 0, t, w)
    os.close(w)
    os.read(r, 1)  # the writer is about to start saving
    os.close(r)
    delay = random.uniform(0.0, float(max_delay))
    signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-4))
    signal.pause()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    snap = os.path.join(snapdir, str(t))
    if not os.path.lexists(dest):
      results.append({"trial": t, "missing": True})
      continue
    if os.path.isdir(dest):
      shutil.copytree(dest, snap)
    else:
      shutil.copyfile(dest, snap)
    results.append({"trial": t, "missing": False, "delay": delay})
  print(json.dumps(results))


def race(kind, dest, rounds):
  pids = []
  for which in (0, 1):
    pid = os.fork()
    if pid == 0:
      _writer(kind, dest, False, int(rounds), which)
    pids.append(pid)
  codes = [os.waitpid(p, 0)[1] for p in pids]
  print(json.dumps({"exit_codes": codes}))


if __name__ == "__main__":
  {"kill": kill, "race": race}[sys.argv[1]](*sys.argv[2:])
