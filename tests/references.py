"""Independent numpy references for the int4 and fp8 schemes (written from their definitions)."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def rnd(x):
  """Round half away from zero."""
  return np.sign(x) * np.floor(np.abs(x) + 0.5)


def int4_reference(w: np.ndarray, group: int, asymmetric: bool, axis: int = 0):
  """Codes, scales and zero points of a per-group int4 quantization along ``axis``.

  Symmetric: ``scale = max|w| / 7`` per group, ``q = clip(round(w / scale), -7, 7)``
  (codes returned centred, as ``QArray.codes()`` gives them). Asymmetric:
  ``scale = (max(hi, 0) - min(lo, 0)) / 15``, ``zp = clip(round(-lo / scale), 0, 15)``,
  ``q = clip(round(w / scale) + zp, 0, 15)``. Scales floored at 1e-8.

  Returns:
    ``(q, scale, zp)``: ``q`` shaped like ``w``; ``scale`` and ``zp`` with
    ``ceil(n / group)`` entries along ``axis`` (``zp`` is ``None`` when symmetric).
  """
  w = np.moveaxis(np.asarray(w, np.float32), axis, 0)
  n = w.shape[0]
  nb = -(-n // group)
  padded = np.concatenate([w, np.zeros((nb * group - n,) + w.shape[1:], np.float32)])
  blocks = padded.reshape((nb, group) + w.shape[1:])
  if asymmetric:
    lo = np.minimum(blocks.min(1), 0)
    hi = np.maximum(blocks.max(1), 0)
    s = np.maximum(((hi - lo) / np.float32(15)).astype(np.float32), np.float32(1e-8))
    zp = np.clip(rnd(-lo / s), 0, 15)
    full = np.repeat(s, group, axis=0)[:n]
    q = np.clip(rnd(w / full) + np.repeat(zp, group, axis=0)[:n], 0, 15)
  else:
    s = np.maximum((np.abs(blocks).max(1) / np.float32(7)).astype(np.float32), np.float32(1e-8))
    zp = None
    q = np.clip(rnd(w / np.repeat(s, group, axis=0)[:n]), -7, 7)
  back = lambda a: None if a is None else np.moveaxis(a, 0, axis)  # noqa: E731
  return back(q), back(s), back(zp)


def pack_reference(codes: np.ndarray, axis: int, fill: int) -> np.ndarray:
  """Two codes a byte along ``axis``, low nibble first, an odd tail padded with ``fill``."""
  c = np.moveaxis(np.asarray(codes, np.uint8), axis, 0)
  if c.shape[0] % 2:
    c = np.concatenate([c, np.full((1,) + c.shape[1:], fill, np.uint8)])
  out = np.empty((c.shape[0] // 2,) + c.shape[1:], np.uint8)
  for i in range(out.shape[0]):
    out[i] = c[2 * i] | (c[2 * i + 1] << 4)
  return np.moveaxis(out, 0, axis)


def fp8_grid(y):
  """``y`` rounded onto the E4M3 grid as ml_dtypes converts (saturated at 448), as floats."""
  y32 = np.asarray(y, np.float32)
  return np.clip(y32, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def gptq_reference(w, xtx, scale, zero, qmin, qmax, damp=0.01, act_order=False, fp8=False):
  """GPTQ (Frantar et al. 2022, Algorithm 1) in float64 numpy, in the paper's layout.

  The paper's ``W`` is ``[d_row, d_col]`` (outputs x inputs) and quantizes one
  input column at a time: ``q = quant(w_:,j)``, ``err = (w - q) / [H^-1]_jj``,
  ``W_:,j: -= err [H^-1]_j,j:`` with ``H^-1`` the upper Cholesky factor of the
  inverse of ``H = X^T X + damp * mean(diag) * I``; no lazy batching here.
  Takes and returns our ``[K, N]`` (inputs x outputs) layout. ``fp8``: the grid is
  E4M3 (``q = fp8(w / s)``, float values returned), ``zero``, ``qmin``, ``qmax`` unused.
  """
  W = np.array(w, np.float64).T.copy()  # [N, K]
  S, Z = np.asarray(scale, np.float64).T, np.asarray(zero, np.float64).T
  H = np.array(xtx, np.float64)
  dead = np.diag(H) == 0
  H[dead, dead] = 1.0
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(len(H))
  W, S, Z, H = W[:, perm], S[:, perm], Z[:, perm], H[perm][:, perm]
  H += damp * np.mean(np.diag(H)) * np.eye(len(H))
  U = np.linalg.cholesky(np.linalg.inv(H)).T
  Q = np.zeros_like(W)
  for j in range(W.shape[1]):
    if fp8:
      q = fp8_grid(W[:, j] / S[:, j])
    else:
      q = np.clip(rnd(W[:, j] / S[:, j]) + Z[:, j], qmin, qmax)
    Q[:, j] = q
    err = (W[:, j] - (q - Z[:, j]) * S[:, j]) / U[j, j]
    W[:, j:] -= np.outer(err, U[j, j:])
  Q = Q[:, np.argsort(perm)]
  return Q.T if fp8 else Q.T.astype(np.int32)


def fp8_reference(w: np.ndarray, scheme: str, tile: int = 128):
  """Values and scales of a 2-D ``[K, N]`` array under an fp8 E4M3 scheme, in numpy.

  ``scale = max(fl32(max|w| / 448), 1e-8)`` over the tensor, each column
  (``fp8_e4m3_per_channel``) or each ``tile x tile`` tile (``fp8_e4m3_block128``,
  returned in the per-block layout ``[ceil(K / tile), N]``: each tile's scale
  repeated over its columns); ``values = float8_e4m3fn(clip(fl32(w / scale), -448,
  448))`` as ``ml_dtypes`` converts (round to nearest, ties to even).
  """
  w = np.asarray(w, np.float32)
  a = np.abs(w)
  k, n = w.shape
  if scheme == "fp8_e4m3_per_tensor":
    m = a.max(keepdims=True)
  elif scheme == "fp8_e4m3_per_channel":
    m = a.max(0, keepdims=True)
  else:
    nk, nn = -(-k // tile), -(-n // tile)
    padded = np.zeros((nk * tile, nn * tile), np.float32)
    padded[:k, :n] = a
    m = np.repeat(padded.reshape(nk, tile, nn, tile).max((1, 3)), tile, axis=1)[:, :n]
  s = np.maximum(m / np.float32(448), np.float32(1e-8)).astype(np.float32)
  full = np.repeat(s, tile, axis=0)[:k] if scheme == "fp8_e4m3_block128" else s
  q = np.clip(w / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
  return q, s
