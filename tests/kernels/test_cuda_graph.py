"""kvlab.kernels.cuda captured into a CUDA graph (torch.cuda.CUDAGraph) and replayed: the bytes equal the
eager calls'. Needs a CUDA GPU and torch (skipped without; the device machine runs it:
``python -m pytest -q tests/kernels/test_cuda_graph.py``).

A capture fails when a call launches on another stream than the capturing one (the legacy default
stream, say), synchronizes, allocates or copies; so a captured step that replays with the eager bytes
shows each entry point launches on torch's current stream and does none of those. The steps are decode
shaped (1 token x 8 KV heads x 128): K written by set_rows, V by the fused rotate+quantize with ids, both
read back (dequantize, dequantize_unrotate), plus rotate; and a prefill's set_rows with more ids than a
CUDA block checks (the ids check kernel, its per-stream word). A replay with a bad id writes nothing and
raise_refused() reports it after the synchronize.
"""
import os

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1",
                                reason="needs a CUDA GPU (torch.cuda)")

HEADS, HEAD_DIM, CACHE_ROWS, STEPS = 8, 128, 64, 4
COLS = HEADS * HEAD_DIM


def kc():
    import kvlab.kernels.cuda as kc
    return kc


def warm_up_then_capture(step, fresh_plans):
    """step() once eagerly on a side stream (torch's advice for capture; here: compile, load, record),
    then captured; fresh_plans: the capture takes numba's dispatcher, not the recorded launches."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    if fresh_plans:
        kc()._PLANS.clear()
        kc()._DIRECT.clear()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g


class Decode:
    """One layer's decode step over K/V caches of one type (V rotated with n = 64, as llama.cpp does
    for a q8_0/q4_0 V), its inputs in fixed buffers (k, v, row) as a graph needs them."""

    def __init__(self, type_name):
        from kvlab.rotation import hadamard_scale
        from kvlab.types import TYPES
        self.info = info = TYPES[type_name]
        self.n, self.scale = 64, hadamard_scale(64)
        row_bytes = info.row_bytes(COLS)
        z = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device="cuda")  # noqa: E731
        self.k, self.v, self.row = z(1, COLS), z(1, COLS), z(1, dtype=torch.int64)
        self.k_cache, self.v_cache = z(CACHE_ROWS, row_bytes, dtype=torch.uint8), z(CACHE_ROWS, row_bytes, dtype=torch.uint8)
        self.k_back, self.v_back, self.rotated = z(CACHE_ROWS, COLS), z(CACHE_ROWS, COLS), z(1, COLS)

    def __call__(self):
        k = kc()
        k.set_rows(self.k_cache, self.row, self.k, self.info, 2)
        k.rotate_quantize(self.v, self.v_cache, self.info, 2, self.n, self.scale, row_ids=self.row)
        k.dequantize(self.k_cache, self.k_back, self.info)
        k.dequantize_unrotate(self.v_cache, self.v_back, self.info, self.n, self.scale)
        k.rotate(self.k, self.rotated, self.n, self.scale)

    def outputs(self):
        return {name: getattr(self, name).clone() for name in ("k_cache", "v_cache", "k_back", "v_back", "rotated")}

    def feed(self, t, k, v):
        self.k.copy_(k)
        self.v.copy_(v)
        self.row.fill_(t)


def assert_same_bytes(got, want):
    for name in want:
        g, w = got[name], want[name]
        differing = (g.view(torch.uint8) != w.view(torch.uint8)).sum().item() if g.dtype != torch.uint8 \
            else (g != w).sum().item()
        assert differing == 0, f"{name}: {differing} bytes differ from the eager calls"


@pytest.mark.parametrize("fresh_plans", [False, True], ids=["replayed_launches", "dispatcher"])
@pytest.mark.parametrize("type_name", ["q4_0", "q8_0"])
def test_a_captured_decode_step_writes_the_eager_bytes(type_name, fresh_plans):
    torch.manual_seed(0)
    inputs = [(torch.randn(1, COLS, device="cuda"), torch.randn(1, COLS, device="cuda")) for _ in range(STEPS)]
    eager, graphed = Decode(type_name), Decode(type_name)
    for t, (k, v) in enumerate(inputs):
        eager.feed(t, k, v)
        eager()
    g = warm_up_then_capture(graphed, fresh_plans)
    graphed.k_cache.zero_()
    graphed.v_cache.zero_()
    for t, (k, v) in enumerate(inputs):
        graphed.feed(t, k, v)
        g.replay()
    torch.cuda.synchronize()
    kc().raise_refused()                                  # nothing refused
    assert_same_bytes(graphed.outputs(), eager.outputs())
    assert graphed.k_cache[:STEPS].any() and not graphed.k_cache[STEPS:].any()

    before = graphed.outputs()                            # a replay whose id lies past the cache
    graphed.feed(CACHE_ROWS, *inputs[0])
    g.replay()
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="outside"):
        kc().raise_refused()
    after = graphed.outputs()
    for name in ("k_cache", "v_cache"):
        assert torch.equal(after[name], before[name]), f"{name}: a refused replay wrote"


def test_a_captured_prefill_checks_its_ids_on_the_stream():
    """2048 ids: checked by check_rows_kernel first, into the capture stream's own word."""
    from kvlab.types import TYPES
    info, n = TYPES["q8_0"], 2048
    torch.manual_seed(1)
    values = torch.randn(n, COLS, device="cuda")
    ids = torch.randperm(2 * n, device="cuda")[:n]
    eager = torch.zeros(2 * n, info.row_bytes(COLS), dtype=torch.uint8, device="cuda")
    kc().set_rows(eager, ids, values, info, 0)
    cache = torch.zeros_like(eager)
    g = warm_up_then_capture(lambda: kc().set_rows(cache, ids, values, info, 0), False)
    cache.zero_()
    g.replay()
    torch.cuda.synchronize()
    kc().raise_refused()
    assert torch.equal(cache, eager)
    cache.zero_()
    ids[n // 2] = 2 * n                                   # one id past the cache: nothing written
    g.replay()
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="outside"):
        kc().raise_refused()
    assert not cache.any()


def test_calls_on_a_side_stream_run_there():
    """A call inside torch.cuda.stream(s) is ordered on s: the side stream's writes before it are seen,
    with no synchronize between them (the GPU is kept busy first, so a launch on another stream would
    run before them)."""
    from kvlab.types import TYPES
    info = TYPES["q4_0"]
    x = torch.randn(64, COLS, device="cuda")
    want = torch.empty(64, info.row_bytes(COLS), dtype=torch.uint8, device="cuda")
    kc().quantize(x, want, info, 0)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    src = torch.zeros_like(x)
    out = torch.zeros_like(want)
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)                     # ~25 ms of GPU time on s
        src.copy_(x)
        kc().quantize(src, out, info, 0)
    s.synchronize()
    assert torch.equal(out, want)
    out.zero_()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
        src.copy_(x * 2)
    kc().quantize(src, out, info, 0, stream=s)           # stream= names it from outside
    s.synchronize()
    kc().quantize(x * 2, want, info, 0)
    torch.cuda.synchronize()
    assert torch.equal(out, want)
