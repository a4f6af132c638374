"""Malformed CLI invocations and inputs: exit 2, one stderr line naming the user's
path or argument, no traceback, no temporary file names; nothing written."""

import json
import os

import numpy as np
import pytest

import sensorquant_jax as sq
from sensorquant_jax import cli
from sensorquant_jax._src import fileio as _fileio
from sensorquant_jax.example_model import load_example


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  t = tmp_path_factory.mktemp("cli_errors")
  (t / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
  (t / "bad.json").write_text('{"config_json": "{}", "layers": [')
  (t / "weights.txt").write_text("1 2 3")
  (t / "notes.txt").write_text("mine")
  (t / "other.json").write_text('{"something": "else"}')
  (t / "empty_dir").mkdir()
  (t / "userdir").mkdir()
  (t / "userdir" / "f.txt").write_text("mine")
  w = np.ones((64, 64), np.float32)
  np.savez(t / "float.npz", **{"params/fc/kernel": w})
  w_nan = w.copy()
  w_nan[0, 0] = np.nan
  np.savez(t / "nan.npz", **{"params/fc/kernel": w_nan})
  np.savez(t / "clash.npz", **{"a": w, "a/b": w})
  np.savez(t / "other_tree.npz", **{"x/kernel": w})
  rules = {
    "rules_notjson.json": "{not json",
    "rules_regex.json": json.dumps([["(", None]]),
    "rules_one.json": json.dumps([["fc"]]),
    "rules_nonstr.json": json.dumps([[1, None]]),
    "rules_key.json": json.dumps([{"pattern": "fc", "schem": None}]),
    "rules_scheme.json": json.dumps([["fc", "int3"]]),
    "rules_number.json": "5",
    "rules_deep.json": "[" * 100000 + "]" * 100000,
    "rules_axes.json": json.dumps(
      [{"pattern": "fc", "scheme": "symmetric_per_channel_int8", "axes": "x"}]
    ),
  }
  for name, text in rules.items():
    (t / name).write_text(text)
  _, variables, _ = load_example()
  sq.save(t / "ck_channel", sq.quantize(variables, "symmetric_per_channel_int8"))
  sq.save(t / "ck_other", sq.quantize({"w": np.ones((64, 64), np.float32)}))
  sq.to_manifest(sq.quantize(variables), "{}").save(t / "m.json")
  for name, mutate in {
    "ck_badpart": lambda d: d["leaves"][0].__setitem__("part", "x"),
    "ck_deep": None,
    "ck_blocksize": lambda d: [
      e.__setitem__("block_size", 64) for e in d["leaves"] if e["kind"] == "qarray"
    ],
    "ck_checksum": lambda d: d["leaves"][0].__setitem__("dtype", "float16"),
  }.items():
    dst = t / name
    sq.save(dst, sq.quantize({"w": np.ones((64, 64), np.float32)}))
    spec = dst / "sensorquant.json"
    if mutate is None:
      spec.write_text(
        '{"format": "sensorquant_jax/1", "leaves": ' + "[" * 50000 + "]" * 50000 + "}"
      )
    else:
      doc = json.loads(spec.read_text())
      if name != "ck_checksum":
        doc.pop("leaves_sha256")  # a deliberate edit: the field checks must catch it
      mutate(doc)
      spec.write_text(json.dumps(doc))
  return t


def _cases(t):
  """(argv, text that must appear in the one stderr line)."""
  p = lambda name: str(t / name)  # noqa: E731
  return [
    ([], "required"),
    (["bogus"], "bogus"),
    (["quantize", "--scheme", "nope"], "nope"),
    (["quantize", "--bogus-flag"], "--bogus-flag"),
    (["inspect"], "path"),
    (["convert", p("m.json")], "dst"),
    (["eval", p("a"), p("b")], p("b")),
    (["quantize", p("missing.npz"), "--out", p("o")], p("missing.npz")),
    (["quantize", p("corrupt.npz"), "--out", p("o")], p("corrupt.npz")),
    (["quantize", p("weights.txt"), "--out", p("o")], p("weights.txt")),
    (["quantize", p("nan.npz"), "--out", p("o")], "params/fc/kernel"),
    (["quantize", p("clash.npz"), "--out", p("o")], p("clash.npz")),
    (["quantize", p("clash.npz"), "--out", p("o"), "--manifest", p("c.json")], p("clash.npz")),
    (["quantize", "--out", p("o"), "--rules", p("rules_notjson.json")], p("rules_notjson.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_missing.json")], p("rules_missing.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_regex.json")], p("rules_regex.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_one.json")], p("rules_one.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_nonstr.json")], p("rules_nonstr.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_key.json")], p("rules_key.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_scheme.json")], p("rules_scheme.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_number.json")], p("rules_number.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_deep.json")], p("rules_deep.json")),
    (["quantize", "--out", p("o"), "--rules", p("rules_axes.json")], p("rules_axes.json")),
    (["quantize", "--out", "."], "current folder"),
    (["quantize", "--out", ""], "empty path"),
    (["quantize", "--out", ".."], "parent of the current folder"),
    (["quantize", "--out", p("userdir")], p("userdir")),
    (["quantize", "--out", p("notes.txt")], p("notes.txt")),
    (["quantize", "--out", p("ck_other")], "--overwrite"),
    (["quantize", "--out", p("o"), "--manifest", p("empty_dir")], p("empty_dir")),
    (["quantize", "--out", p("o"), "--manifest", p("other.json")], p("other.json")),
    (["quantize", "--out", p("o"), "--manifest", p("nowhere/m.json")], p("nowhere/m.json")),
    (["quantize", "--out", p("o"), "--manifest", p("o")], p("o")),
    (["quantize", "--out", p("o"), "--manifest", p("m.json")], "--overwrite"),
    (["quantize", "--processes", "0"], "--processes"),
    (["quantize", "--processes", "two"], "--processes"),
    (["quantize", "--out", p("o"), "--processes", "2"], "give SRC"),
    (["quantize", p("float.npz"), "--out", p("o"), "--processes", "2", "--report"], "--report"),
    (
      ["quantize", p("float.npz"), "--out", p("o"), "--processes", "2", "--manifest", p("x.json")],
      "--manifest",
    ),
    (["quantize", p("float.npz"), "--out", p("ck_other"), "--processes", "2"], "--overwrite"),
    (["inspect", p("bad.json")], p("bad.json")),
    (["inspect", p("nothing")], p("nothing")),
    (["inspect", p("corrupt.npz")], p("corrupt.npz")),
    (["inspect", p("weights.txt")], p("weights.txt")),
    (["inspect", p("ck_badpart")], "'part' must be an integer"),
    (["inspect", p("ck_checksum")], "checksum"),
    (["inspect", p("ck_deep")], "nested too deeply"),
    (["inspect", p("ck_blocksize")], "'block_size' must be null"),
    (["eval", p("nothing")], p("nothing")),
    (["eval", p("empty_dir")], p("empty_dir")),
    (["eval", p("ck_badpart")], "'part' must be an integer"),
    (["eval", p("ck_other")], p("ck_other")),
    (["convert", p("bad.json"), p("x")], p("bad.json")),
    (["convert", p("missing"), p("x")], p("missing")),
    (["convert", p("ck_channel"), p("x.json")], "--requantize"),
    (["convert", p("ck_channel"), p("ck_channel")], p("ck_channel")),
    (["convert", p("ck_channel"), p("other.json"), "--requantize"], p("other.json")),
    (["convert", p("m.json"), p("userdir")], p("userdir")),
    (["convert", p("m.json"), p("x"), "--like", p("missing.npz")], p("missing.npz")),
    (["convert", p("m.json"), p("x"), "--like", p("other_tree.npz")], "--like"),
    (["convert", p("m.json"), p("x"), "--like", p("clash.npz")], p("clash.npz")),
  ]


def test_malformed_invocations(files, capsys, monkeypatch):
  monkeypatch.chdir(files)
  before = sorted(os.listdir(files))
  cases = _cases(files)
  assert len(cases) >= 40
  for argv, needle in cases:
    code = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    lines = err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("sensorquant: error:"), (argv, err)
    assert needle in lines[0], (argv, lines[0])
    assert "Traceback" not in err and _fileio.TEMP_MARK not in err, (argv, err)
  assert sorted(os.listdir(files)) == before  # nothing was written anywhere


def test_help_has_every_argument_with_defaults(capsys):
  for argv in (["--help"], ["quantize", "--help"], ["convert", "--help"], ["eval", "--help"]):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out
  assert cli.main(["quantize", "--help"]) == 0
  out = " ".join(capsys.readouterr().out.split())
  for flag in ("--out", "--scheme", "--rules", "--manifest", "--report", "--overwrite"):
    assert flag in out
  assert "default: sensor_encoder_int8" in out and "default: symmetric_per_channel_int8" in out


def test_convert_requantize_warns_in_one_line(files, capsys, tmp_path):
  code = cli.main(["convert", str(files / "ck_channel"), str(tmp_path / "m.json"), "--requantize"])
  assert code == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("sensorquant: warning: requantized per-tensor")
  assert sq.manifest.QuantizedModel.load(tmp_path / "m.json").scheme == "symmetric_per_tensor_int8"


def test_piped_output_has_no_progress_and_no_blank_first_line(files, capsys, tmp_path):
  assert cli.main(["inspect", str(files / "ck_channel")]) == 0
  captured = capsys.readouterr()
  assert captured.out.strip() and not captured.out.startswith("\n")
  assert captured.err == ""
