"""The manifest format's error type and the limits its reader enforces."""

from __future__ import annotations

MAX_DEPTH = 128  # serde_json's recursion limit
U64_MAX = 2**64 - 1
MAX_RANK = 64  # shape entries per layer (Rust has no limit; real layers use <= 8)


class ManifestError(ValueError):
  """A manifest is malformed, inconsistent, or cannot be written exactly."""
