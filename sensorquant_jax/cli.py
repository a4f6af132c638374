"""The ``sensorquant`` command line: quantize, inspect, eval, convert."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_BAD_INPUT = 2


class UsageError(Exception):
  """Bad input reported as one line, without a traceback."""


def _console():
  from rich.console import Console  # noqa: PLC0415

  # Piped or captured output gets wide tables rather than truncated names.
  return Console(width=None if sys.stdout.isatty() else 160)


def _progress():
  from rich.progress import (  # noqa: PLC0415
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
  )

  return Progress(
    TextColumn("{task.description}"),
    BarColumn(),
    TimeElapsedColumn(),
    transient=True,
    console=_console(),
  )


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "kB", "MB", "GB"):
    if n < 1000 or unit == "GB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1000
  return f"{n:.1f} GB"


def _load_rules(path: str | None):
  if path is None:
    return None
  try:
    with open(path, encoding="utf-8") as f:
      rules = json.load(f)
  except (OSError, ValueError) as e:
    raise UsageError(f"cannot read rules file {path}: {e}") from None
  if isinstance(rules, dict):
    return rules
  if not isinstance(rules, list) or not all(isinstance(r, (list, dict)) for r in rules):
    raise UsageError(f"{path}: rules must be a list of [pattern, scheme] pairs or a mapping")
  return [tuple(r) if isinstance(r, list) else r for r in rules]


# ---------------------------------------------------------------------------
# Commands.
# ---------------------------------------------------------------------------


def cmd_quantize(args) -> None:
  import jax  # noqa: PLC0415

  import sensorquant_jax as sq  # noqa: PLC0415
  from sensorquant_jax import checkpoint, stream  # noqa: PLC0415
  from sensorquant_jax.example_model import accuracy, load_example  # noqa: PLC0415

  console = _console()
  rules = _load_rules(args.rules)
  if args.src is None:
    model, variables, split = load_example()
    with _progress() as bar:
      task = bar.add_task("quantizing the bundled sensor encoder", total=None)
      qvars = sq.quantize(variables, args.scheme, rules)
      bar.update(task, completed=1, total=1)
    config = model.config.to_json()
    sq.save(
      args.out,
      qvars,
      {
        "model": "sensorquant_jax.example_model.SensorEncoder",
        "config": config,
        "scheme": args.scheme,
      },
    )
    f_acc = accuracy(jax.jit(lambda x: model.apply(variables, x)), split["x"], split["y"])
    q_acc = accuracy(jax.jit(lambda x: sq.apply(model, qvars, x)), split["x"], split["y"])
    console.print(
      f"bundled sensor encoder (UCI HAPT, {len(split['y'])} held-out windows, "
      f"subjects 22-30), scheme {args.scheme}"
    )
    console.print(f"  float32: accuracy {f_acc:.2%}, params {_fmt_bytes(sq.nbytes(variables))}")
    console.print(
      f"  int8   : accuracy {q_acc:.2%}, params {_fmt_bytes(sq.nbytes(qvars))} "
      f"({sq.nbytes(variables) / sq.nbytes(qvars):.2f}x smaller), "
      f"change {100 * (q_acc - f_acc):+.2f} points"
    )
    console.print(f"  saved to {args.out}")
    if args.manifest:
      # The manifest format is per-tensor: quantize the float weights for it directly.
      man = sq.to_manifest(sq.quantize(variables, sq.SCHEMES[0], rules), config)
      man.save(args.manifest)
      console.print(f"  manifest ({sq.SCHEMES[0]}): {args.manifest} ({len(man.layers)} layers)")
    if args.report:
      sq.report(variables, qvars)
    return
  with _progress() as bar:
    task = bar.add_task(f"quantizing {os.path.basename(args.src)}", total=None)
    summary = stream.quantize_file(
      args.src,
      args.out,
      args.scheme,
      rules,
      progress=lambda path, done: bar.update(task, description=f"quantized {path}"),
    )
  console.print(
    f"{summary['quantized']} of {summary['leaves']} leaves quantized: "
    f"{_fmt_bytes(summary['float_bytes'])} -> {_fmt_bytes(summary['stored_bytes'])}; "
    f"saved to {args.out}"
  )
  if args.manifest:
    man = sq.to_manifest(sq.quantize(checkpoint.load_float(args.src), sq.SCHEMES[0], rules))
    man.save(args.manifest)
    console.print(f"manifest ({sq.SCHEMES[0]}): {args.manifest} ({len(man.layers)} layers)")
  if args.report:
    sq.report(checkpoint.load_float(args.src), checkpoint.restore(args.out))


def cmd_inspect(args) -> None:
  import jax  # noqa: PLC0415
  from rich.table import Table  # noqa: PLC0415

  import sensorquant_jax as sq  # noqa: PLC0415
  from sensorquant_jax import checkpoint  # noqa: PLC0415

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
  if os.path.isdir(path) and os.path.exists(os.path.join(path, checkpoint.SPEC_FILE)):
    tree = checkpoint.restore(path)
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
  import jax  # noqa: PLC0415
  from rich.table import Table  # noqa: PLC0415

  import sensorquant_jax as sq  # noqa: PLC0415
  from sensorquant_jax import checkpoint  # noqa: PLC0415
  from sensorquant_jax.example_model import accuracy, load_example  # noqa: PLC0415

  model, variables, split = load_example()
  x, y = split["x"], split["y"]
  rows: list[tuple[str, Any, str]] = [("float32", variables, "-")]
  if args.ckpt is not None:
    like = sq.quantize(variables, "symmetric_per_tensor_int8")
    tree = checkpoint.restore(args.ckpt)
    if jax.tree_util.tree_structure(sq.dequantize(tree)) != jax.tree_util.tree_structure(
      sq.dequantize(like)
    ):
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
  for name, tree, mode in rows:
    if mode == "-":
      fn = jax.jit(lambda x, t=tree: model.apply(t, x))
    else:
      fn = jax.jit(lambda x, t=tree, m=mode: sq.apply(model, t, x, mode=m))
    acc = accuracy(fn, x, y)
    base = acc if base is None else base
    table.add_row(
      name, mode, f"{acc:.2%}", f"{100 * (acc - base):+.2f}", _fmt_bytes(sq.nbytes(tree))
    )
  _console().print(table)


def cmd_convert(args) -> None:
  import sensorquant_jax as sq  # noqa: PLC0415
  from sensorquant_jax import checkpoint  # noqa: PLC0415
  from sensorquant_jax.example_model import load_example  # noqa: PLC0415

  console = _console()
  src, dst = args.src, args.dst
  if not os.path.exists(src):
    raise UsageError(f"{src}: no such file or folder")
  if os.path.isdir(src):
    tree = checkpoint.restore(src)
    config = checkpoint.read_spec(src)["metadata"].get("config", "{}")
    man = sq.to_manifest(
      tree, config if isinstance(config, str) else json.dumps(config), requantize=args.requantize
    )
    man.save(dst)
    console.print(
      f"wrote manifest {dst}: {len(man.layers)} layers, {_fmt_bytes(man.total_quantized_bytes)}"
    )
    return
  man = sq.manifest.QuantizedModel.load(src)
  if args.like is not None:
    like = checkpoint.load_float(args.like)
  else:
    _, like, _ = load_example()
  tree = sq.from_manifest(man, like)
  sq.save(dst, tree, {"config": man.config_json, "from_manifest": os.path.basename(src)})
  console.print(f"wrote checkpoint {dst} from {len(man.layers)} manifest layers")


def build_parser() -> argparse.ArgumentParser:
  import sensorquant_jax as sq  # noqa: PLC0415

  ap = argparse.ArgumentParser(prog="sensorquant", description=__doc__)
  sub = ap.add_subparsers(dest="command", required=True)
  q = sub.add_parser("quantize", help="quantize a float checkpoint (default: the bundled model)")
  q.add_argument("src", nargs="?", help=".npz, .safetensors, .msgpack or Orbax folder")
  q.add_argument("--out", default="sensor_encoder_int8", help="output checkpoint folder")
  q.add_argument("--scheme", default="symmetric_per_channel_int8", choices=sq.SCHEMES)
  q.add_argument("--rules", help="JSON file: [[pattern, scheme or null], ...]")
  q.add_argument("--manifest", help="also write the Rust manifest (FILE.json)")
  q.add_argument("--report", action="store_true", help="print a per-leaf error table")
  q.set_defaults(fn=cmd_quantize)
  i = sub.add_parser("inspect", help="list the layers of a manifest or checkpoint")
  i.add_argument("path")
  i.set_defaults(fn=cmd_inspect)
  e = sub.add_parser("eval", help="accuracy of float vs int8 on the bundled evaluation split")
  e.add_argument("ckpt", nargs="?", help="a quantized checkpoint of the bundled model")
  e.set_defaults(fn=cmd_eval)
  c = sub.add_parser("convert", help="quantized checkpoint <-> manifest")
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--like", help="float checkpoint giving the tree (manifest -> checkpoint)")
  c.add_argument(
    "--requantize", action="store_true", help="requantize other schemes per-tensor for the manifest"
  )
  c.set_defaults(fn=cmd_convert)
  return ap


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (bad input: 2, one line on stderr)."""
  args = build_parser().parse_args(argv)
  from sensorquant_jax import checkpoint  # noqa: PLC0415
  from sensorquant_jax.manifest import ManifestError  # noqa: PLC0415
  from sensorquant_jax.quantize import NonFiniteError  # noqa: PLC0415

  try:
    args.fn(args)
  except (
    UsageError,
    ManifestError,
    NonFiniteError,
    checkpoint.CheckpointError,
    OSError,
    ValueError,
    KeyError,
  ) as e:
    message = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f"sensorquant: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    print("sensorquant: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
