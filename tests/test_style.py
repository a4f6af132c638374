"""The code base stays ruff-clean (config in pyproject.toml)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
  exe = os.path.join(os.path.dirname(sys.executable), "ruff")
  return exe if os.path.exists(exe) else shutil.which("ruff")


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
  ruff = _ruff()
  if ruff is None:
    pytest.skip("ruff is not installed")
  proc = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_type_check():
  """mypy (config in pyproject.toml) finds no errors in the package."""
  proc = subprocess.run(
    [sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  if "No module named mypy" in proc.stderr:
    pytest.skip("mypy is not installed")
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
