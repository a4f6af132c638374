"""Safe writes: refused destinations, overwrite, kill -9 mid-save, concurrent writers."""

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax import checkpoint, cli
from sensorquant_jax import manifest as m
from sensorquant_jax._src import fileio as _fileio

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _crash_writer as cw  # noqa: E402


def _digest(path) -> dict:
  """Every file under ``path`` (or the file itself) with its content hash and mode."""
  out = {}
  path = str(path)
  if os.path.isfile(path):
    return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
  for folder, dirs, files in os.walk(path):
    for name in dirs + files:
      full = os.path.join(folder, name)
      rel = os.path.relpath(full, path)
      if os.path.isfile(full):
        with open(full, "rb") as f:
          out[rel] = (hashlib.sha256(f.read()).hexdigest(), os.stat(full).st_mode)
      else:
        out[rel] = ("dir", os.stat(full).st_mode)
  return out


def _leftovers(folder) -> list[str]:
  return [e for e in os.listdir(folder) if _fileio.TEMP_MARK in e]


def _cli(args, cwd):
  exe = os.path.join(os.path.dirname(sys.executable), "sensorquant")
  cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "sensorquant_jax"]
  return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


# ---------------------------------------------------------------------------
# Refused destinations (CLI, as a process, and API).
# ---------------------------------------------------------------------------


@pytest.fixture
def workspace(tmp_path):
  """A folder that looks like a user's project: sources, a .git, a float checkpoint."""
  ws = tmp_path / "project"
  (ws / ".git").mkdir(parents=True)
  (ws / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
  (ws / "train.py").write_text("print('mine')\n")
  (ws / "mine").mkdir()
  (ws / "mine" / "notes.txt").write_text("do not delete\n")
  (ws / "report.json").write_text('{"accuracy": 0.9}')
  np.savez(ws / "float.npz", **{"params/fc/kernel": np.ones((64, 64), np.float32)})
  return ws


@pytest.mark.parametrize(
  "out, needle",
  [
    (".", "current folder"),
    ("", "empty path"),
    ("..", "parent of the current folder"),
    ("mine", "folder of other files"),
    ("train.py", "is a file"),
    ("report.json", "is a file"),
  ],
)
def test_cli_refuses_destinations_and_keeps_every_byte(workspace, out, needle):
  before = _digest(workspace.parent)
  proc = _cli(["quantize", "float.npz", "--out", out], cwd=workspace)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
  assert _fileio.TEMP_MARK not in proc.stderr
  assert _digest(workspace.parent) == before


def test_cli_refuses_manifest_over_another_file_before_writing_anything(workspace):
  before = _digest(workspace)
  proc = _cli(["quantize", "float.npz", "--out", "ck", "--manifest", "report.json"], cwd=workspace)
  assert proc.returncode == 2 and "report.json" in proc.stderr and "not a manifest" in proc.stderr
  assert _digest(workspace) == before  # the checkpoint was not written either


def test_cli_overwrite_replaces_only_a_checkpoint(workspace):
  assert _cli(["quantize", "float.npz", "--out", "ck"], cwd=workspace).returncode == 0
  first = _digest(workspace / "ck")
  proc = _cli(["quantize", "float.npz", "--out", "ck"], cwd=workspace)
  assert proc.returncode == 2 and "--overwrite" in proc.stderr
  assert _digest(workspace / "ck") == first
  proc = _cli(
    [
      "quantize",
      "float.npz",
      "--out",
      "ck",
      "--overwrite",
      "--scheme",
      "symmetric_per_tensor_int8",
    ],
    cwd=workspace,
  )
  assert proc.returncode == 0, proc.stderr
  assert (
    checkpoint.read_spec(workspace / "ck")["leaves"][0]["scheme"] == "symmetric_per_tensor_int8"
  )
  # --overwrite still never replaces user files.
  before = _digest(workspace)
  os.chdir(workspace)
  try:
    for out in ("mine", "train.py", ".", ".."):
      assert cli.main(["quantize", "float.npz", "--out", out, "--overwrite"]) == 2
  finally:
    os.chdir(ROOT)
  assert _digest(workspace) == before
  assert _leftovers(workspace) == []


@pytest.mark.parametrize("kind", ["checkpoint", "manifest", "calibration"])
def test_api_refuses_without_overwrite_and_other_kinds_always(tmp_path, kind):
  dest = str(tmp_path / ("out" if kind == "checkpoint" else "out.json"))
  payload = cw.contents(kind, 0)
  cw.save(kind, dest, payload)  # creates (overwrite=True is allowed on a missing path)
  saved = _digest(dest)
  with pytest.raises(sq.DestinationError, match="overwrite=True"):
    if kind == "checkpoint":
      sq.save(dest, payload)
    elif kind == "manifest":
      payload.save(dest)
    else:
      sq.save_calibration(dest, payload)
  assert _digest(dest) == saved
  other = tmp_path / ("other_dir" if kind == "checkpoint" else "other.json")
  if kind == "checkpoint":
    other.mkdir()
    (other / "x.txt").write_text("mine")
  else:
    other.write_text('{"something": "else"}')
  before = _digest(other)
  with pytest.raises(sq.DestinationError, match="refusing"):
    cw.save(kind, str(other), payload)
  assert _digest(other) == before
  cw.save(kind, dest, cw.contents(kind, 1))  # overwrite=True replaces our own output
  assert _digest(dest) != saved


def test_checkpoint_into_an_empty_folder_and_mode(tmp_path):
  (tmp_path / "empty").mkdir()
  sq.save(tmp_path / "empty", {"w": np.ones((4, 4), np.float32)})
  assert checkpoint.is_checkpoint(tmp_path / "empty")
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(tmp_path / "empty").st_mode & 0o777 == 0o777 & ~umask


def test_writer_abort_keeps_the_old_checkpoint(tmp_path):
  dest = tmp_path / "ck"
  sq.save(dest, {"w": np.ones((4, 4), np.float32)})
  before = _digest(dest)
  with pytest.raises(RuntimeError):
    with checkpoint.CheckpointWriter(dest, overwrite=True) as w:
      w.add("w", np.zeros((4, 4), np.float32))
      raise RuntimeError("interrupted")
  assert _digest(dest) == before and _leftovers(tmp_path) == []


def test_two_step_swap_fallback_and_recovery(tmp_path, monkeypatch):
  """Without renameat2, the swap takes two renames; an interruption between them
  is rolled back by the next reader."""
  monkeypatch.setattr(_fileio, "_renameat2", None)
  dest = tmp_path / "ck"
  sq.save(dest, {"w": np.ones((4, 4), np.float32)})
  sq.save(dest, {"w": np.full((4, 4), 2, np.float32)}, overwrite=True)
  np.testing.assert_array_equal(sq.restore(dest)["w"], 2)
  assert _leftovers(tmp_path) == []
  # Simulate a process killed between the two renames: the old folder sits
  # aside under a dead process's "old" name and the path is missing.
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  pid = int(dead.stdout)
  aside = tmp_path / f".ck{_fileio.TEMP_MARK}{pid}-old-abc"
  os.rename(dest, aside)
  np.testing.assert_array_equal(sq.restore(dest)["w"], 2)  # rolled back
  assert not aside.exists()


# ---------------------------------------------------------------------------
# kill -9 in the middle of saves; concurrent writers.
# ---------------------------------------------------------------------------


def _check_snapshot(kind, path) -> int:
  """Which of the two payloads ``path`` holds (raises if neither / unreadable)."""
  if kind == "checkpoint":
    tree = sq.restore(path)
    which = int(tree["tag"])
    np.testing.assert_array_equal(tree["w"], cw.contents(kind, which)["w"])
    return which
  if kind == "manifest":
    man = m.QuantizedModel.load(path)
    which = json.loads(man.config_json)["which"]
    assert man == cw.contents(kind, which)
    return which
  cal = sq.load_calibration(path)
  which = int(cal["layer0"].act_max)
  assert cal == cw.contents(kind, which)
  return which


def _save_seconds(kind, dest) -> float:
  payload = cw.contents(kind, 0)
  t0 = time.perf_counter()
  for _ in range(3):
    cw.save(kind, dest, payload)
  return (time.perf_counter() - t0) / 3


@pytest.mark.parametrize("kind", ["checkpoint", "manifest", "calibration"])
def test_kill_9_during_overwrites_leaves_old_or_new(tmp_path, kind):
  dest = str(tmp_path / ("ck" if kind == "checkpoint" else "out.json"))
  per_save = _save_seconds(kind, dest)
  snaps = tmp_path / "snaps"
  snaps.mkdir()
  trials = 30
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(HERE, "_crash_writer.py"),
      "kill",
      kind,
      dest,
      str(snaps),
      str(trials),
      str(3 * per_save),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(results) == trials
  assert not any(r["missing"] for r in results), "the path went missing after a kill"
  seen = {_check_snapshot(kind, snaps / str(r["trial"])) for r in results}
  assert seen <= {0, 1}
  # Killed writers left temporaries behind (usually); the next save removes them.
  cw.save(kind, dest, cw.contents(kind, 1))
  assert _leftovers(tmp_path) == []
  assert _check_snapshot(kind, dest) == 1


@pytest.mark.parametrize("kind", ["checkpoint", "manifest", "calibration"])
def test_concurrent_writers_leave_a_valid_file(tmp_path, kind):
  dest = str(tmp_path / ("ck" if kind == "checkpoint" else "out.json"))
  proc = subprocess.run(
    [sys.executable, os.path.join(HERE, "_crash_writer.py"), "race", kind, dest, "20"],
    capture_output=True,
    text=True,
    timeout=600,
    env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1])["exit_codes"] == [0, 0], proc.stderr
  assert _check_snapshot(kind, dest) in (0, 1)
  assert _leftovers(tmp_path) == []
