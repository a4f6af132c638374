"""The bundled example: a small SensorLM-style IMU encoder trained on UCI HAPT.

A Flax Linen model that classifies 2.56 s windows (128 samples at 50 Hz) of
smartphone accelerometer and gyroscope signals into 6 activities. Weights and
a held-out evaluation split (subjects 22-30, never seen in training) ship with
the package; ``examples/train_sensor_encoder.py`` reproduces them.

Data: UCI "Smartphone-Based Recognition of Human Activities and Postural
Transitions" (HAPT), Reyes-Ortiz, Oneto, Samà, Parra and Anguita (2016),
Neurocomputing 171:754-767; CC BY 4.0.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

ACTIVITIES = ("walking", "walking_upstairs", "walking_downstairs", "sitting", "standing", "laying")
CHANNELS = ("acc-x", "acc-y", "acc-z", "gyro-x", "gyro-y", "gyro-z")
WINDOW = 128


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Hyper-parameters of :class:`SensorEncoder` (also stored as the manifest's config)."""

  patch: int = 16
  d_model: int = 96
  depth: int = 3
  heads: int = 4
  mlp: int = 192
  classes: int = len(ACTIVITIES)
  channels: int = len(CHANNELS)
  window: int = WINDOW

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


class EncoderBlock(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=c.heads, name="attn")(h, h)
    h = nn.LayerNorm(name="ln2")(x)
    h = nn.gelu(nn.Dense(c.mlp, name="mlp_in")(h))
    return x + nn.Dense(c.d_model, name="mlp_out")(h)


class SensorEncoder(nn.Module):
  """Patch embedding of multichannel IMU windows, a transformer encoder, a classifier.

  Input ``[batch, window, channels]`` raw signals; the per-channel
  standardisation measured on the training set lives in the ``stats``
  collection. Output: logits ``[batch, classes]``.
  """

  config: EncoderConfig = EncoderConfig()

  @nn.compact
  def __call__(self, x):
    c = self.config
    mean = self.variable("stats", "mean", jnp.zeros, (c.channels,))
    std = self.variable("stats", "std", jnp.ones, (c.channels,))
    x = (x - mean.value) / std.value
    b = x.shape[0]
    patches = x.reshape(b, c.window // c.patch, c.patch * c.channels)
    h = nn.Dense(c.d_model, name="patch_embed")(patches)
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, patches.shape[1], c.d_model))
    h = h + pos
    for i in range(c.depth):
      h = EncoderBlock(c, name=f"blocks_{i}")(h)
    h = nn.LayerNorm(name="ln_f")(h)
    return nn.Dense(c.classes, name="head")(jnp.mean(h, axis=1))


def _data_file(name: str):
  return importlib.resources.files("sensorquant_jax").joinpath("data").joinpath(name)


def load_example() -> tuple[SensorEncoder, Any, dict[str, np.ndarray]]:
  """Returns ``(model, variables, eval_split)`` of the bundled sensor encoder.

  ``eval_split`` holds ``x`` (float32 ``[n, 128, 6]``), ``y`` (int labels into
  :data:`ACTIVITIES`) and ``subject`` (22-30, held out from training).
  """
  model = SensorEncoder()
  template = model.init(jax.random.key(0), jnp.zeros((1, WINDOW, len(CHANNELS))))
  variables = serialization.from_bytes(template, _data_file("sensor_encoder.msgpack").read_bytes())
  with _data_file("hapt_eval.npz").open("rb") as f:
    data = np.load(f)
    split = {
      "x": data["x"].astype(np.float32),
      "y": data["y"].astype(np.int32),
      "subject": data["subject"].astype(np.int32),
    }
  return model, variables, split


def accuracy(logits_fn, x: np.ndarray, y: np.ndarray, batch: int = 512) -> float:
  """Top-1 accuracy of ``logits_fn`` over ``x`` in batches."""
  correct = 0
  for i in range(0, len(x), batch):
    logits = logits_fn(jnp.asarray(x[i : i + batch]))
    correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == y[i : i + batch]))
  return correct / max(len(x), 1)
