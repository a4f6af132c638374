"""Block-by-block calibration: the same results as the passes, one forward in all,
one compilation per distinct block, and the activations it keeps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from llm_models import Config as GemmaConfig
from llm_models import Llama, LlamaConfig, init_plain, plain_forward

import sensorquant_jax as sq
from sensorquant_jax._src import awq, blockwise
from sensorquant_jax._src.tree_paths import path_str

CFG = LlamaConfig(layers=2)


def llama_batches(n=2, shape=(2, 32)):
  return [jax.random.randint(jax.random.key(10 + i), shape, 0, CFG.vocab) for i in range(n)]


def to_scan(params: dict, layers: int) -> dict:
  """The loop model's params as the ``nn.scan`` model holds them (layers stacked)."""
  p = dict(params["params"])
  per = [p.pop(f"layers_{i}") for i in range(layers)]
  p["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *per)}
  return {"params": p}


@pytest.fixture(scope="module")
def llama():
  model = Llama(CFG)
  batches = llama_batches()
  return model, model.init(jax.random.key(0), batches[0]), batches


def paths(tree) -> list[str]:
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def quantized_equal(a, b):
  """Every leaf equal, codes and scales included (QArrays are pytrees)."""
  chex.assert_trees_all_equal(a, b)


@pytest.mark.parametrize(
  ("scheme", "sequential"), [(sq.INT4, True), (sq.PER_TENSOR, True), (sq.PER_CHANNEL, False)]
)
def test_gptq_block_by_block_equals_the_passes(llama, scheme, sequential):
  model, params, batches = llama
  with pytest.warns(UserWarning, match="embed/embedding"):  # a lookup: round-to-nearest
    got = sq.gptq(model, params, batches, scheme, sequential=sequential, progress=False)
  with pytest.warns(UserWarning, match="embed/embedding"):
    want = sq.gptq(
      model, params, batches, scheme, sequential=sequential, blockwise=False, progress=False
    )
  quantized_equal(got, want)
  rtn = sq.quantize(params, scheme)
  assert not np.array_equal(
    got["params"]["layers_1"]["down"]["kernel"].codes(),
    rtn["params"]["layers_1"]["down"]["kernel"].codes(),
  )


@pytest.mark.filterwarnings("ignore:gptq. round-to-nearest kept")
def test_gptq_on_the_scanned_stack_equals_the_loop(llama):
  """``nn.scan`` (one leaf per kernel, layers stacked): each layer's matrix gets the codes
  the loop model's own kernel gets."""
  model, params, batches = llama
  scan = Llama(CFG, scan=True)
  stacked = to_scan(params, CFG.layers)
  like = (scan.apply, batches[0])  # per-channel scales per layer of the stack
  got = sq.gptq(scan, stacked, batches, sq.PER_CHANNEL, like=like, progress=False)
  want = sq.gptq(model, params, batches, sq.PER_CHANNEL, blockwise=False, progress=False)
  pairs = [
    (got["params"]["layers"]["block"][name]["kernel"], i, want["params"][f"layers_{i}"][name])
    for i in range(CFG.layers)
    for name in ("q", "k", "v", "o", "gate", "up", "down")
  ]
  pairs.append((got["params"]["lm_head"]["kernel"], None, want["params"]["lm_head"]))
  for a, i, b in pairs:
    ca = np.asarray(a.codes() if i is None else a.codes()[i])
    cb = np.asarray(b["kernel"].codes())
    # the scanned and the loop programs may round the activations differently
    assert np.mean(ca == cb) > 0.995


@pytest.mark.parametrize("scheme", [sq.INT4, sq.PER_CHANNEL])
@pytest.mark.filterwarnings("ignore:awq. round-to-nearest kept")
def test_awq_block_by_block_equals_the_passes(llama, scheme):
  model, params, batches = llama
  got = sq.awq(model, params, batches, scheme, grid=8, progress=False)
  want = sq.awq(model, params, batches, scheme, grid=8, blockwise=False, progress=False)
  quantized_equal(got, want)
  assert got["params"]["layers_0"]["q"]["kernel"].input_scale is not None


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_smoothquant_block_by_block_equals_the_passes(llama, alpha):
  model, params, batches = llama
  got = sq.smoothquant(model, params, batches, alpha, progress=False)
  want = sq.smoothquant(model, params, batches, alpha, blockwise=False, progress=False)
  chex.assert_trees_all_equal(got, want)
  assert isinstance(got["params"]["layers_1"]["gate"]["kernel"], sq.InputScaled)


def test_smoothquant_auto_on_the_scanned_stack(llama):
  """``alpha="auto"`` now reaches kernels found at the op: each layer of the stack
  chooses as the loop model's layer does."""
  model, params, batches = llama
  scan = Llama(CFG, scan=True)
  got = sq.smoothquant(scan, to_scan(params, CFG.layers), batches, "auto", progress=False)
  want = sq.smoothquant(model, params, batches, "auto", blockwise=False, progress=False)
  for i in range(CFG.layers):
    for name in ("q", "o", "gate", "down"):
      a = got["params"]["layers"]["block"][name]["kernel"]
      b = want["params"][f"layers_{i}"][name]["kernel"]
      np.testing.assert_allclose(
        np.asarray(a.input_scale[i]).ravel(), np.asarray(b.input_scale).ravel(), rtol=1e-4
      )


def test_bits_budget_block_by_block_equals_the_passes(llama):
  model, params, batches = llama
  budget = sq.Budget(max_bits_per_weight=5.0)
  with pytest.warns(UserWarning, match="embed/embedding"):
    got = sq.auto_policy(params, budget=budget, model=model, batches=batches, method="rtn")
  with pytest.warns(UserWarning, match="embed/embedding"):
    want = sq.auto_policy(
      params, budget=budget, model=model, batches=batches, method="rtn", blockwise=False
    )
  assert got.rules == want.rules
  assert got.reasons == want.reasons


def test_ragged_batches_run_in_lockstep(llama):
  """A last batch of another shape gets its own trace, cut alike; the sums cover all."""
  model, params, batches = llama
  ragged = [batches[0], batches[1][:1, :16]]
  with pytest.warns(UserWarning, match="embed/embedding"):
    got = sq.gptq(model, params, ragged, sq.PER_CHANNEL, progress=False)
  with pytest.warns(UserWarning, match="embed/embedding"):
    want = sq.gptq(model, params, ragged, sq.PER_CHANNEL, blockwise=False, progress=False)
  quantized_equal(got, want)


def test_a_plain_function_with_a_scan_and_remat():
  """The hand-written decoder (``lax.scan`` over stacked layers, ``jax.checkpoint``,
  a nested ``jit``): one stage per group, measured on the float model it equals the
  whole-model passes."""
  cfg = GemmaConfig(layers=3)
  params = init_plain(cfg, jax.random.key(0))
  batches = [jax.random.randint(jax.random.key(i), (2, 16), 0, cfg.vocab) for i in range(2)]

  def fn(p, t):
    return plain_forward(p, t, cfg)

  got = sq.gptq(fn, params, batches, sq.PER_CHANNEL, sequential=False, progress=False)
  want = sq.gptq(
    fn, params, batches, sq.PER_CHANNEL, sequential=False, blockwise=False, progress=False
  )
  for a, b in [(got["embedding"], want["embedding"])] + [
    (got["layers"][n], want["layers"][n]) for n in ("wqkv", "wo", "w_up", "w_down")
  ]:  # the tied output layer too
    assert np.mean(np.asarray(a.codes()) == np.asarray(b.codes())) > 0.995


def _compiles(fn) -> int:
  """XLA compilations ``fn()`` triggers, caches cleared first."""
  count = [0]

  def listen(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1

  jax.clear_caches()
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return count[0]


@pytest.mark.parametrize("scan", [False, True])
def test_one_compilation_per_distinct_block(scan):
  """Doubling the depth adds no compilation: every stage of a block is the same program,
  the slice of a stacked layer included."""
  counts, stages = [], []
  for layers in (2, 3):
    cfg = LlamaConfig(layers=layers)
    model = Llama(cfg, scan=scan)
    batches = llama_batches(2)
    params = model.init(jax.random.key(0), batches[0])
    leaves = {p for p in paths(params) if p.endswith("kernel")}
    compiled = blockwise.Compiled()

    def go(model=model, params=params, batches=batches, leaves=leaves, compiled=compiled):
      blockwise.run(
        lambda v, t: model.apply(v, t),
        params,
        batches,
        leaves,
        awq.moments,
        lambda *a: None,
        compiled=compiled,
      )

    counts.append(_compiles(go))
    stages.append(len(compiled.cache))
  # q/k/v, o, gate/up, down, the prologue and the last block's head: six distinct stages
  assert stages == [6, 6]
  assert counts[0] == counts[1]


def test_kept_activations_are_one_cut_for_every_batch(llama):
  """The bound the README states: tokens x (dim + max(dim, hidden)) float32 values."""
  model, params, batches = llama
  kept: list[int] = []
  blockwise.run(
    lambda v, t: model.apply(v, t),
    params,
    batches,
    set(paths(params)),
    awq.moments,
    lambda *a: None,
    kept_bytes=kept,
  )
  tokens = sum(b.size for b in batches)
  assert max(kept) == tokens * (CFG.dim + max(CFG.dim, CFG.hidden)) * 4


def test_progress_gives_the_time_left(llama, capsys):
  model, params, batches = llama
  with pytest.warns(UserWarning, match="embed/embedding"):
    sq.gptq(model, params, batches[:1], sq.PER_CHANNEL)
  err = capsys.readouterr().err
  assert "gptq: block 1/9" in err and "s left" in err
  assert "gptq params/layers_1/down/kernel" in err
