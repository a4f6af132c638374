"""The package's shape: public namespaces, private modules, import cost, old names."""

import ast
import importlib
import json
import os
import subprocess
import sys
import types
import warnings

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
DEPRECATED = {
  "sensorquant_jax.schemes": ["SCHEMES", "PER_TENSOR", "Spec", "default_axes", "resolve"],
  "sensorquant_jax.quantize": ["Rule", "NonFiniteError", "MIN_SIZE", "quantize_array"],
  "sensorquant_jax.ops": ["PackedQArray", "dense", "dense_general", "pack", "MODES", "IMPLS"],
  "sensorquant_jax.linen": ["apply", "QuantizedDense", "transpose_2d"],
  "sensorquant_jax.qarray": ["QArray", "is_qarray"],
  "sensorquant_jax.calibrate": ["calibrate", "ObserverConfig", "OBSERVERS", "save_calibration"],
  "sensorquant_jax.report": ["report", "auto_policy", "Budget", "Policy", "CANDIDATES"],
  "sensorquant_jax.convert": ["to_manifest", "from_manifest", "RequantizationWarning"],
}


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


@pytest.mark.parametrize("module", sorted(DEPRECATED))
def test_old_module_names_still_work_with_a_deprecation_warning(module):
  mod = importlib.import_module(module)
  for name in DEPRECATED[module]:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      value = getattr(mod, name)
    assert value is not None
    assert any(issubclass(w.category, DeprecationWarning) for w in caught), (module, name)
  with pytest.raises(AttributeError):
    mod.no_such_name  # noqa: B018


def test_functions_stay_callable_after_importing_their_old_modules():
  import jax.numpy as jnp

  # Importing these rebinds sq.quantize / sq.calibrate / sq.report to the modules.
  import sensorquant_jax.calibrate
  import sensorquant_jax.quantize
  import sensorquant_jax.report  # noqa: F401

  q = sq.quantize({"w": jnp.ones((64, 64))})
  assert sq.is_qarray(q["w"])
  result = sq.report({"w": jnp.ones((64, 64))}, q, show=False)
  assert result["layers"][0]["name"] == "w"
  assert callable(sq.calibrate)


def test_every_private_module_has_a_home_in_the_readme_table():
  readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
  for f in sorted(os.listdir(os.path.join(PACKAGE, "_src"))):
    if f.endswith(".py") and f != "__init__.py":
      assert f"`{f[:-3]}`" in readme, f
