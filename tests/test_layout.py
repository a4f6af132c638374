"""The package's shape: public namespaces, private modules, import cost, old names."""

import ast
import importlib
import json
import os
import subprocess
import sys
import types

import pytest

import sensorquant_jax as sq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sensorquant_jax")
PUBLIC = [
  "sensorquant_jax",
  "sensorquant_jax.manifest",
  "sensorquant_jax.nnx",
  "sensorquant_jax.checkpoint",
  "sensorquant_jax.stream",
  "sensorquant_jax.example_model",
  "sensorquant_jax.cli",
]


def test_public_namespaces_match_the_checked_in_list():
  with open(os.path.join(ROOT, "tests", "public_api.json")) as f:
    expected = json.load(f)
  for name in PUBLIC:
    module = importlib.import_module(name)
    assert sorted(module.__all__) == expected[name], name
    for attr in module.__all__:
      assert getattr(module, attr) is not None, (name, attr)
    # Nothing beyond the documented names is reachable except dunders and the
    # lazy-loading machinery.
    # Nothing else is reachable but dunders, imported submodules (which Python
    # sets as attributes) and the lazy-loading machinery.
    extra = {
      k
      for k, v in vars(module).items()
      if not k.startswith("_") and k not in module.__all__ and not isinstance(v, types.ModuleType)
    }
    assert not extra, (name, sorted(extra))


def _imports(path):
  tree = ast.parse(open(path, encoding="utf-8").read())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      for alias in node.names:
        yield node.module, alias.name


def test_no_underscore_imports_across_modules_outside_the_private_package():
  bad = []
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(folder, f)
      private = os.sep + "_src" + os.sep in path
      for module, name in _imports(path):
        if not module.startswith("sensorquant_jax"):
          continue
        if name.startswith("_") and not private:
          bad.append(f"{path}: from {module} import {name}")
        if private and name.startswith("_") and not module.startswith("sensorquant_jax._src"):
          bad.append(f"{path}: from {module} import {name}")
  assert not bad, bad


def test_private_modules_do_not_import_each_others_private_names():
  bad = []
  for f in os.listdir(os.path.join(PACKAGE, "_src")):
    if f.endswith(".py"):
      for module, name in _imports(os.path.join(PACKAGE, "_src", f)):
        if module.startswith("sensorquant_jax") and name.startswith("_") and name != "__version__":
          bad.append(f"{f}: from {module} import {name}")
  assert not bad, bad


def test_import_is_cheap_and_builds_nothing(tmp_path):
  code = (
    "import sys, time\n"
    "t = time.perf_counter()\n"
    "import sensorquant_jax\n"
    "print(time.perf_counter() - t, 'jax' in sys.modules, 'flax' in sys.modules)\n"
  )
  env = dict(os.environ, SENSORQUANT_CACHE=str(tmp_path / "cache"))
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
  )
  assert out.returncode == 0, out.stderr
  seconds, jax_loaded, flax_loaded = out.stdout.split()
  assert float(seconds) < 1.5 and jax_loaded == "False" and flax_loaded == "False", out.stdout
  assert not (tmp_path / "cache").exists()  # no native build on import


@pytest.mark.parametrize(
  "module", ["schemes", "quantize", "ops", "linen", "qarray", "calibrate", "report", "convert"]
)
def test_no_alias_modules(module):
  """Every implementation module is private; nothing was released under these names."""
  with pytest.raises(ModuleNotFoundError):
    importlib.import_module(f"sensorquant_jax.{module}")
  assert callable(sq.quantize) and callable(sq.report) and callable(sq.calibrate)


def test_every_private_module_has_a_home_in_the_readme_table():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  for f in sorted(os.listdir(os.path.join(PACKAGE, "_src"))):
    if f.endswith(".py") and f != "__init__.py":
      assert f"`{f[:-3]}`" in readme, f
