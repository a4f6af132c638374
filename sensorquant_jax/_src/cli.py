"""The sensorquant command line: quantize, inspect, eval, convert.

Every user-caused failure is one line on stderr naming the path or argument,
exit code 2, no traceback. Progress goes to stderr, and only to a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from typing import Any

EXIT_BAD_INPUT = 2
_DEFAULT_OUT = "sensor_encoder_int8"
_CALIBRATION_SUBJECTS = 24
"""GPTQ, AWQ and bits budgets on the bundled model calibrate on subjects 22-24."""


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
  if not value > 0 or value != value or value == float("inf"):
    raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
  return value


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
  return value


class UsageError(Exception):
  """Bad input reported as one line, without a traceback."""


def _console(quiet: bool = False):
  from rich.console import Console

  # Piped or captured output gets wide tables rather than truncated names.
  return Console(width=None if sys.stdout.isatty() else 160, quiet=quiet)


class _Exit(Exception):
  """Ends the command with this exit code (its message is already printed)."""

  def __init__(self, code: int):
    super().__init__(code)
    self.code = code


class _NoProgress:
  """Stands in for a progress bar when stderr is not a terminal."""

  def add_task(self, *args, **kwargs) -> int:
    return 0

  def update(self, *args, **kwargs) -> None:
    pass

  def advance(self, *args, **kwargs) -> None:
    pass


@contextlib.contextmanager
def _progress():
  """A transient progress display on stderr, or nothing when stderr is not a TTY."""
  if not sys.stderr.isatty():
    yield _NoProgress()
    return
  from rich.console import Console
  from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

  with Progress(
    TextColumn("{task.description}"),
    BarColumn(),
    TimeElapsedColumn(),
    transient=True,
    console=Console(stderr=True),
  ) as bar:
    yield bar


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000
  return f"{n:.1f} GB"


def _load_rules(path: str | None):
  """Reads and validates a rules file (a list of rules or a {pattern: scheme} map)."""
  if path is None:
    return None
  from sensorquant_jax._src.quantize import as_rules

  try:
    with open(path, encoding="utf-8") as f:
      rules = json.load(f)
  except OSError as e:
    raise UsageError(f"cannot read rules file {path}: {e.strerror or e}") from None
  except RecursionError:
    raise UsageError(f"rules file {path}: JSON nested too deeply") from None
  except ValueError as e:
    raise UsageError(f"rules file {path} is not valid JSON: {e}") from None
  if isinstance(rules, list):
    rules = [tuple(r) if isinstance(r, list) else r for r in rules]
  elif not isinstance(rules, dict):
    raise UsageError(f"rules file {path}: expected a list of [pattern, scheme] pairs or a mapping")
  try:
    return as_rules(rules)
  except (ValueError, TypeError) as e:
    raise UsageError(f"rules file {path}: {e}") from None


def _check_out_dir(path: str, overwrite: bool) -> None:
  from sensorquant_jax._src import checkpoint, fileio

  fileio.check_dir_destination(path, overwrite=overwrite, is_ours=checkpoint.is_checkpoint)


def _check_out_manifest(path: str, overwrite: bool) -> None:
  from sensorquant_jax._src import fileio, manifest

  fileio.check_file_destination(
    path, overwrite=overwrite, is_ours=manifest.is_manifest_file, kind="manifest"
  )


# ---------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------


def cmd_quantize(args) -> None:
  import jax

  import sensorquant_jax as sq
  from sensorquant_jax._src import checkpoint, distributed, stream
  from sensorquant_jax._src.example_model import accuracy, load_example

  console = _console()
  rules = _load_rules(args.rules)
  # Every destination is checked before anything is written.
  _check_out_dir(args.out, args.overwrite)
  if args.manifest:
    if os.path.abspath(args.manifest) == os.path.abspath(args.out):
      raise UsageError(f"--manifest {args.manifest} and --out {args.out} are the same path")
    _check_out_manifest(args.manifest, args.overwrite)
  if args.src is not None and not os.path.exists(args.src):
    raise UsageError(f"{args.src}: no such file or folder")
  if args.bits_per_weight is not None and rules is not None:
    raise UsageError("--bits-per-weight chooses every layer's scheme itself: drop --rules")
  if args.processes > 1:
    if args.src is None:
      raise UsageError("--processes splits a checkpoint between processes: give SRC")
    for flag, given in (
      ("--bits-per-weight", args.bits_per_weight is not None),
      ("--manifest", args.manifest),
      ("--report", args.report),
    ):
      if given:
        raise UsageError(f"{flag} reads the whole model in one process: drop --processes or it")
    if distributed.NUM_PROCESSES not in os.environ:  # the parent: start the processes
      code = distributed.launch(["-m", "sensorquant_jax", *args.argv], args.processes)
      if code:
        raise _Exit(code)
      return
  if args.steps is not None and args.method != "qat":
    raise UsageError("--steps sets the training of --method qat: add --method qat or drop it")
  args.steps = 300 if args.steps is None else args.steps
  if args.method in ("qat", "awq+gptq") and args.bits_per_weight is not None:
    raise UsageError(
      f"--bits-per-weight weighs rtn, gptq or awq, not {args.method}: drop one of them"
    )
  if args.src is not None and args.method != "rtn":
    raise UsageError(
      f"--method {args.method} needs a model and its inputs: it runs on the bundled model "
      "(no src); for your own model call sq.gptq / sq.awq / sq.distill"
    )
  calibrated = args.method != "rtn" or args.bits_per_weight is not None
  policy = None
  if args.src is None:
    with _progress() as bar:
      task = bar.add_task("loading the bundled sensor encoder", total=4)
      model, variables, split = load_example()
      batches: list[Any] = []
      if calibrated:  # calibrate on subjects 22-24, evaluate on the others
        cal = split["subject"] <= _CALIBRATION_SUBJECTS
        batches = [split["x"][cal][i : i + 256] for i in range(0, int(cal.sum()), 256)]
        split = {k: v[~cal] for k, v in split.items()}
      if args.bits_per_weight is not None:
        bar.update(task, description=f"choosing schemes for {args.bits_per_weight} bits/weight")
        policy = sq.auto_policy(
          variables,
          budget=sq.Budget(max_bits_per_weight=args.bits_per_weight),
          model=model,
          batches=batches,
          method=args.method,
        )
        rules = list(policy.rules)
      bar.update(task, advance=1, description=f"quantizing ({args.method})")
      if args.method == "gptq":
        qvars = sq.gptq(model, variables, batches, args.scheme, rules, progress=False)
      elif args.method in ("awq", "awq+gptq"):
        qvars = sq.awq(
          model,
          variables,
          batches,
          args.scheme,
          rules,
          rounding="gptq" if args.method == "awq+gptq" else "nearest",
          progress=False,
        )
      elif args.method == "qat":
        # From GPTQ's rounding; no labels: the float model's class distributions are the targets.
        start = sq.dequantize(
          sq.gptq(model, variables, batches, args.scheme, rules, progress=False)
        )
        bar.update(task, description=f"training through quantization ({args.steps} steps)")
        tree = sq.distill(
          model,
          variables,
          batches,
          args.scheme,
          rules,
          steps=args.steps,
          loss="kl",
          start=start,
          progress=False,
        )
        qvars = sq.qat_export(tree)
      else:
        qvars = sq.quantize(variables, args.scheme, rules)
      config = model.config.to_json()
      bar.update(task, advance=1, description=f"saving {args.out}")
      sq.save(
        args.out,
        qvars,
        {
          "model": "sensorquant_jax.example_model.SensorEncoder",
          "config": config,
          "scheme": "mixed" if policy is not None else args.scheme,
          "method": args.method,
        },
        overwrite=args.overwrite,
      )
      bar.update(task, advance=1, description="evaluating float32 and quantized")
      f_acc = accuracy(jax.jit(lambda x: model.apply(variables, x)), split["x"], split["y"])
      q_acc = accuracy(jax.jit(lambda x: sq.apply(model, qvars, x)), split["x"], split["y"])
      bar.update(task, advance=1)
    subjects = f"{_CALIBRATION_SUBJECTS + 1}-30" if calibrated else "22-30"
    what = (
      f"{policy.bits_per_weight:.3f} bits/weight (budget {args.bits_per_weight})"
      if policy is not None
      else f"scheme {args.scheme}"
    )
    console.print(
      f"bundled sensor encoder (UCI HAPT, {len(split['y'])} held-out windows, "
      f"subjects {subjects}), {what}, method {args.method}"
      + (f", calibrated on subjects 22-{_CALIBRATION_SUBJECTS}" if calibrated else "")
    )
    console.print(f"  float32: accuracy {f_acc:.2%}, params {_fmt_bytes(sq.nbytes(variables))}")
    label = (
      "mixed"
      if policy is not None
      else "fp8 "
      if args.scheme in sq.FP8_SCHEMES
      else "int4"
      if sq.bits_of(args.scheme) == 4
      else "int8"
    )
    console.print(
      f"  {label}   : accuracy {q_acc:.2%}, params {_fmt_bytes(sq.nbytes(qvars))} "
      f"({sq.nbytes(variables) / sq.nbytes(qvars):.2f}x smaller), "
      f"change {100 * (q_acc - f_acc):+.2f} points"
    )
    console.print(f"  saved to {args.out}")
    if args.manifest:
      # The manifest format is per-tensor: quantize the float weights for it directly.
      man = sq.to_manifest(sq.quantize(variables, sq.SCHEMES[0], rules), config)
      man.save(args.manifest, overwrite=args.overwrite)
      console.print(f"  manifest ({sq.SCHEMES[0]}): {args.manifest} ({len(man.layers)} layers)")
    if args.report:
      sq.report(variables, qvars)
    return
  if args.bits_per_weight is not None:
    with _progress() as bar:
      bar.add_task(f"choosing schemes for {args.bits_per_weight} bits/weight", total=None)
      policy = sq.auto_policy(
        checkpoint.load_float(args.src),
        budget=sq.Budget(max_bits_per_weight=args.bits_per_weight),
      )
    rules = list(policy.rules)
    console.print(f"{policy.bits_per_weight:.3f} bits/weight (budget {args.bits_per_weight})")
  if args.processes > 1:
    distributed.initialize()
    if jax.process_count() != args.processes:
      raise UsageError(f"--processes {args.processes}, but {jax.process_count()} processes joined")
    if jax.process_index():  # one process speaks for all
      console = _console(quiet=True)
  with _progress() as bar:
    task = bar.add_task(f"quantizing {os.path.basename(args.src)}", total=None)
    summary = stream.quantize_file(
      args.src,
      args.out,
      args.scheme,
      rules,
      progress=lambda path, done: bar.update(task, description=f"quantized {path}"),
      overwrite=args.overwrite,
    )
  console.print(
    f"{summary['quantized']} of {summary['leaves']} leaves quantized"
    + (f" by {args.processes} processes" if args.processes > 1 else "")
    + ": "
    f"{_fmt_bytes(summary['float_bytes'])} -> {_fmt_bytes(summary['stored_bytes'])}; "
    f"saved to {args.out}"
  )
  if args.manifest:
    with _progress() as bar:
      bar.add_task(f"writing {args.manifest}", total=None)
      man = sq.to_manifest(sq.quantize(checkpoint.load_float(args.src), sq.SCHEMES[0], rules))
      man.save(args.manifest, overwrite=args.overwrite)
    console.print(f"manifest ({sq.SCHEMES[0]}): {args.manifest} ({len(man.layers)} layers)")
  if args.report:
    sq.report(checkpoint.load_float(args.src), checkpoint.restore(args.out))


def cmd_inspect(args) -> None:
  import jax
  from rich.table import Table

  import sensorquant_jax as sq
  from sensorquant_jax._src import checkpoint

  console = _console()
  path = args.path
  if not os.path.exists(path):
    raise UsageError(f"{path}: no such file or folder")
  table = Table(title=path)
  for col in ("layer", "shape", "scheme", "bytes", "compression"):
    table.add_column(col)
  if os.path.isfile(path) and path.lower().endswith(".json"):
    man = sq.manifest.QuantizedModel.load(path, check_bias=False)
    for layer in man.layers:
      table.add_row(
        layer.name,
        str(list(layer.shape)),
        man.scheme,
        _fmt_bytes(layer.size_bytes()),
        f"{float(layer.compression_ratio()):.2f}x",
      )
    console.print(table)
    console.print(
      f"{len(man.layers)} layers, {_fmt_bytes(man.total_quantized_bytes)} int8 "
      f"(from {_fmt_bytes(man.total_fp32_bytes)} float32), "
      f"compression {float(man.compression_ratio()):.2f}x"
    )
    return
  imported = not checkpoint.is_checkpoint(path) and _imported_source(path)
  tree = None
  if imported or (os.path.isdir(path) and checkpoint.is_checkpoint(path)):
    with _progress() as bar:
      bar.add_task(f"reading {path}", total=None)
      if imported:
        got = sq.load_quantized(path)
        tree = got.params
        table.title = f"{path} ({got.format}, read as the schemes shown)"
      else:
        tree = checkpoint.restore(path)
    if imported and got.format == "safetensors":  # nothing quantized: list it as it is
      tree = None
  if tree is not None:
    total_q = total_f = 0
    for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=sq.is_qarray)[0]:
      if sq.is_qarray(x):
        total_q += x.nbytes
        total_f += x.original_nbytes
        table.add_row(
          sq.path_str(p),
          str(tuple(x.shape)),
          x.scheme,
          _fmt_bytes(x.nbytes),
          f"{x.original_nbytes / x.nbytes:.2f}x",
        )
      elif hasattr(x, "nbytes"):
        total_q += x.nbytes
        total_f += x.nbytes
        table.add_row(
          sq.path_str(p), str(tuple(x.shape)), f"float ({x.dtype})", _fmt_bytes(x.nbytes), "1.00x"
        )
    console.print(table)
    console.print(
      f"{_fmt_bytes(total_q)} stored (from {_fmt_bytes(total_f)}), "
      f"compression {total_f / max(total_q, 1):.2f}x"
    )
    return
  total = 0
  for name, x in checkpoint.iter_float_leaves(path):
    total += x.nbytes
    table.add_row(name, str(tuple(x.shape)), f"float ({x.dtype})", _fmt_bytes(x.nbytes), "-")
  console.print(table)
  console.print(f"float checkpoint, {_fmt_bytes(total)}")


def cmd_eval(args) -> None:
  import jax
  from rich.table import Table

  import sensorquant_jax as sq
  from sensorquant_jax._src import checkpoint
  from sensorquant_jax._src.example_model import accuracy, load_example

  if args.ckpt is not None and not os.path.exists(args.ckpt):
    raise UsageError(f"{args.ckpt}: no such file or folder")
  with _progress() as bar:
    task = bar.add_task("loading the bundled sensor encoder", total=None)
    model, variables, split = load_example()
    x, y = split["x"], split["y"]
    rows: list[tuple[str, Any, str]] = [("float32", variables, "-")]
    if args.ckpt is not None:
      like = sq.quantize(variables, "symmetric_per_tensor_int8")
      tree = checkpoint.restore(args.ckpt)
      want: Any = jax.tree_util.tree_structure(sq.dequantize(like))
      if jax.tree_util.tree_structure(sq.dequantize(tree)) != want:
        raise UsageError(f"{args.ckpt} does not hold the bundled sensor encoder")
      rows.append(
        (f"checkpoint {os.path.basename(os.path.normpath(args.ckpt))}", tree, "weight_only")
      )
    else:
      for scheme in sq.SCHEMES:
        rows.append((scheme, sq.quantize(variables, scheme), "weight_only"))
        rows.append((scheme, rows[-1][1], "w8a8"))
    table = Table(title=f"bundled sensor encoder, {len(y)} held-out windows (subjects 22-30)")
    for col in ("variant", "mode", "accuracy", "vs float", "params"):
      table.add_column(col)
    base = None
    bar.update(task, total=len(rows), completed=0)
    for name, tree, mode in rows:
      bar.update(task, description=f"evaluating {name} ({mode})")
      if mode == "-":
        fn = jax.jit(lambda x, t=tree: model.apply(t, x))
      else:
        fn = jax.jit(lambda x, t=tree, m=mode: sq.apply(model, t, x, mode=m))
      acc = accuracy(fn, x, y)
      base = acc if base is None else base
      table.add_row(
        name, mode, f"{acc:.2%}", f"{100 * (acc - base):+.2f}", _fmt_bytes(sq.nbytes(tree))
      )
      bar.advance(task)
  _console().print(table)


def _imported_source(path: str) -> bool:
  """A GGUF file, or a ``.safetensors`` file or folder of them (quantized elsewhere)."""
  from sensorquant_jax._src import checkpoint

  if os.path.isfile(path):
    return checkpoint.file_magic(path) == b"GGUF" or path.lower().endswith(".safetensors")
  return os.path.isdir(path) and any(n.endswith(".safetensors") for n in os.listdir(path))


def _write_quantized(args, tree: Any, metadata: dict[str, Any], console) -> None:
  """Writes a quantized tree to ``args.dst``: .gguf, .safetensors (GPTQ) or a checkpoint."""
  import sensorquant_jax as sq

  dst = args.dst
  lower = dst.lower()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", sq.RequantizationWarning)
    try:
      if lower.endswith(".gguf"):
        written = sq.export_gguf(dst, tree, requantize=args.requantize, overwrite=args.overwrite)
        what = f"GGUF {dst}: {len(written)} tensors"
      elif lower.endswith(".safetensors"):
        cfg = sq.export_gptq(
          dst, tree, checkpoint_format=args.gptq_format, overwrite=args.overwrite
        )
        what = f"GPTQ {dst} (quantization_config: {json.dumps(cfg, sort_keys=True)})"
      else:
        _check_out_dir(dst, args.overwrite)
        sq.save(dst, tree, metadata, overwrite=args.overwrite)
        what = f"checkpoint {dst}"
    except ValueError as e:
      if isinstance(e, sq.DestinationError):
        raise
      raise UsageError(str(e).replace("pass requantize=True", "pass --requantize")) from None
  for w in caught:
    print(f"sensorquant: warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
  console.print(f"wrote {what}")


def cmd_convert(args) -> None:
  import sensorquant_jax as sq
  from sensorquant_jax._src import checkpoint
  from sensorquant_jax._src.example_model import load_example

  console = _console()
  src, dst = args.src, args.dst
  if not os.path.exists(src):
    raise UsageError(f"{src}: no such file or folder")
  if os.path.abspath(src) == os.path.abspath(dst):
    raise UsageError(f"{dst}: the destination is the source")
  to_file = dst.lower().endswith((".gguf", ".safetensors"))
  if os.path.isdir(src) and checkpoint.is_checkpoint(src) and to_file:
    with _progress() as bar:
      bar.add_task(f"reading {src}", total=None)
      tree = checkpoint.restore(src)
    _write_quantized(args, tree, {}, console)
    return
  if not checkpoint.is_checkpoint(src) and _imported_source(src):
    with _progress() as bar:
      bar.add_task(f"reading {src}", total=None)
      got = sq.load_quantized(src)
    metadata = {"imported_from": os.path.basename(os.path.normpath(src)), "format": got.format}
    _write_quantized(args, got.params, metadata, console)
    return
  if os.path.isdir(src):
    _check_out_manifest(dst, args.overwrite)
    with _progress() as bar:
      bar.add_task(f"reading {src}", total=None)
      tree = checkpoint.restore(src)
    config = checkpoint.read_spec(src)["metadata"].get("config", "{}")
    try:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sq.RequantizationWarning)
        man = sq.to_manifest(
          tree,
          config if isinstance(config, str) else json.dumps(config),
          requantize=args.requantize,
        )
    except ValueError as e:
      raise UsageError(str(e).replace("pass requantize=True", "pass --requantize")) from None
    for w in caught:
      print(f"sensorquant: warning: {str(w.message).splitlines()[0]}", file=sys.stderr)
    man.save(dst, overwrite=args.overwrite)
    console.print(
      f"wrote manifest {dst}: {len(man.layers)} layers, {_fmt_bytes(man.total_quantized_bytes)}"
    )
    return
  _check_out_dir(dst, args.overwrite)
  if args.like is not None and not os.path.exists(args.like):
    raise UsageError(f"--like {args.like}: no such file or folder")
  with _progress() as bar:
    bar.add_task(f"reading {src}", total=None)
    man = sq.manifest.QuantizedModel.load(src)
    if args.like is not None:
      like = checkpoint.load_float(args.like)
    else:
      _, like, _ = load_example()
  try:
    tree = sq.from_manifest(man, like)
  except ValueError as e:
    hint = (
      f" (compared with --like {args.like})"
      if args.like
      else " (pass --like with the float checkpoint it came from)"
    )
    raise UsageError(f"{src}: {str(e).splitlines()[0]}{hint}") from None
  sq.save(
    dst,
    tree,
    {"config": man.config_json, "from_manifest": os.path.basename(src)},
    overwrite=args.overwrite,
  )
  console.print(f"wrote checkpoint {dst} from {len(man.layers)} manifest layers")


class _ArgumentParser(argparse.ArgumentParser):
  """argparse with our one-line error format (still exit code 2)."""

  def error(self, message: str):
    self.exit(EXIT_BAD_INPUT, f"sensorquant: error: {message.splitlines()[0]}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except the uninformative None and False."""

  def _get_help_string(self, action):
    if action.default in (None, False) or action.default is argparse.SUPPRESS:
      return action.help
    return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
  import sensorquant_jax as sq

  ap = _ArgumentParser(
    prog="sensorquant",
    description="Quantize Flax checkpoints to int8, inspect and evaluate them, and convert "
    "between checkpoints and the Rust sensorlm manifest.",
    formatter_class=_HelpFormatter,
  )
  sub = ap.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
  # (command, handler, one-line help, description, positional arguments)
  commands: list[tuple[str, Any, str, str, list[tuple[str, str | None, str]]]] = [
    (
      "quantize",
      cmd_quantize,
      "quantize a float checkpoint (default: the bundled model)",
      "Quantize a float checkpoint to a sensorquant checkpoint folder. Without SRC, "
      "quantize the bundled sensor encoder and print float vs int8 accuracy and sizes.",
      [("src", "?", "float checkpoint: .npz, .safetensors, .msgpack or an Orbax folder")],
    ),
    (
      "inspect",
      cmd_inspect,
      "list the layers of a manifest or checkpoint",
      "List the layers, shapes, schemes and sizes of a manifest, a quantized "
      "checkpoint or a float checkpoint.",
      [("path", None, "manifest .json, quantized checkpoint folder or float checkpoint")],
    ),
    (
      "eval",
      cmd_eval,
      "accuracy of float vs int8 on the bundled evaluation split",
      "Accuracy on the bundled held-out split: float32 and every scheme, or a "
      "given quantized checkpoint of the bundled model.",
      [("ckpt", "?", "a quantized checkpoint of the bundled model")],
    ),
    (
      "convert",
      cmd_convert,
      "between quantized formats: checkpoint, manifest, GGUF, GPTQ and others",
      "Convert without requantizing: a quantized checkpoint folder to a manifest .json, "
      "a GGUF file (.gguf) or a GPTQ checkpoint (.safetensors); a manifest to a checkpoint "
      "folder; a GGUF file or a Hugging Face quantized checkpoint (GPTQ, AWQ, "
      "compressed-tensors, fp8; a .safetensors file or a folder) to a checkpoint folder, "
      ".gguf or .safetensors.",
      [
        ("src", None, "checkpoint folder, manifest .json, .gguf, or .safetensors file/folder"),
        ("dst", None, "manifest .json, .gguf, .safetensors (GPTQ) or checkpoint folder"),
      ],
    ),
  ]
  parsers = {}
  for name, fn, short, description, positionals in commands:
    p = sub.add_parser(name, help=short, description=description, formatter_class=_HelpFormatter)
    for arg, nargs, text in positionals:
      p.add_argument(arg, nargs=nargs, help=text)
    p.set_defaults(fn=fn)
    parsers[name] = p
  q, c = parsers["quantize"], parsers["convert"]
  q.add_argument("--out", default=_DEFAULT_OUT, help="output checkpoint folder")
  q.add_argument(
    "--scheme", default="symmetric_per_channel_int8", choices=sq.SCHEMES, help="scheme"
  )
  q.add_argument(
    "--rules", help='JSON file: [[pattern, scheme or null], ...] or {"pattern": scheme}'
  )
  q.add_argument(
    "--method",
    default="rtn",
    choices=("rtn", "gptq", "awq", "awq+gptq", "qat"),
    help="rounding: to nearest, GPTQ / AWQ / AWQ's scales then GPTQ calibrated on the bundled "
    "model's inputs, or quantization-aware training from GPTQ's rounding, distilled from the "
    "float model on them",
  )
  q.add_argument(
    "--steps",
    type=_positive_int,
    metavar="N",
    help="training steps of --method qat (default 300)",
  )
  q.add_argument(
    "--bits-per-weight",
    type=_positive_float,
    metavar="B",
    help="choose each layer's scheme for the least error within B stored bits per weight",
  )
  q.add_argument(
    "--processes",
    type=_positive_int,
    metavar="N",
    default=1,
    help="split SRC between N local processes joined by jax.distributed (CPU collectives); "
    "each reads and writes only its share",
  )
  q.add_argument("--manifest", help="also write the Rust manifest to this .json file")
  q.add_argument("--report", action="store_true", help="print a per-leaf error table")
  c.add_argument(
    "--like", help="float checkpoint giving the tree (manifest -> checkpoint; default: bundled)"
  )
  c.add_argument(
    "--requantize",
    action="store_true",
    help="requantize what the destination does not hold: per-tensor for the manifest, Q8_0 "
    "for GGUF (adds error; reported)",
  )
  c.add_argument(
    "--gptq-format",
    default="gptq",
    choices=("gptq", "gptq_v2"),
    help="GPTQ checkpoint format of a .safetensors destination (gptq stores zero points - 1)",
  )
  for p in (q, c):
    p.add_argument(
      "--overwrite",
      action="store_true",
      help="replace an existing checkpoint or manifest (never other files)",
    )
  return ap


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
  text = str(message).splitlines()[0] if str(message) else category.__name__
  print(f"sensorquant: warning: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (bad input: 2, one line on stderr)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    args = build_parser().parse_args(argv)
  except SystemExit as e:
    return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT
  args.argv = argv
  from sensorquant_jax._src import checkpoint, distributed
  from sensorquant_jax._src.fileio import DestinationError
  from sensorquant_jax._src.manifest import ManifestError
  from sensorquant_jax._src.quantize import NonFiniteError

  previous = warnings.showwarning
  warnings.showwarning = _one_line_warning
  # Orbax reports a damaged file once through our error and again through
  # asyncio's "exception was never retrieved" log; the CLI prints only ours.
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  # Each process of a --processes run names itself in its messages.
  who = (
    f"process {os.environ[distributed.PROCESS_ID]}: "
    if distributed.PROCESS_ID in os.environ
    else ""
  )
  try:
    args.fn(args)
  except _Exit as e:
    return e.code
  except distributed.DistributedError as e:
    print(f"sensorquant: {who}error: {_one_line(e)}", file=sys.stderr)
    return 1
  except DestinationError as e:
    hint = "; pass --overwrite to replace it" if e.needs_overwrite else ""
    print(f"sensorquant: {who}error: {e.path or repr(e.path)}: {e.reason}{hint}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except (
    UsageError,
    ManifestError,
    NonFiniteError,
    checkpoint.CheckpointError,
    OSError,
    ValueError,
    KeyError,
  ) as e:
    print(f"sensorquant: {who}error: {_one_line(e)}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    print("sensorquant: interrupted", file=sys.stderr)
    return 130
  finally:
    warnings.showwarning = previous
  return 0


def _one_line(e: BaseException) -> str:
  if isinstance(e, OSError) and e.filename is not None:
    return f"{e.filename}: {e.strerror or e}"
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
  sys.exit(main())
