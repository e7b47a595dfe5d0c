"""Property-based fuzzing of the public API (issue 16): random shapes, dtypes, strides, types, flavors and
row ids. Every call either raises a documented ValueError/TypeError (leaving its inputs untouched) or
returns exactly what the same call returns on contiguous, valid input.

The kernels have no bounds checks, so cases that hand them a hand-corrupted QTensor run in a subprocess:
a segfault there fails the test instead of killing pytest. Examples are derandomized (the same cases on
every run, so CI cannot flake) and counted; the counts print at the end of the module (pytest -s).
"""
from collections import Counter
import os
import subprocess
import sys
import textwrap

from hypothesis import HealthCheck, given, settings, strategies as st
import numpy as np
import pytest
import torch

import kvlab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
COUNTS = Counter()
DOCUMENTED = (ValueError, TypeError)

TYPES = list(kvlab.TYPES)
DTYPES = [np.float32, np.float32, np.float16, np.float64, np.int32, np.bool_, np.complex64]
LAYOUTS = ["C", "F", "reversed", "every_other", "torch", "torch_strided"]


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    print("\nfuzz cases:", dict(sorted(COUNTS.items())), "total", sum(COUNTS.values()))


def _values(seed: int, shape, dtype, specials: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 1e3])
    if specials and x.size:
        flat = x.reshape(-1)
        flat[rng.integers(0, x.size, 3)] = rng.choice([np.nan, np.inf, -np.inf, 1e-41, 0.0, 7e4], 3)
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(dtype)


def in_layout(a: np.ndarray, layout: str):
    """The same values as `a`, laid out differently in memory (a view where the layout needs one)."""
    if a.ndim == 0 or layout == "C":
        return a
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "reversed":                                   # negative strides
        return np.ascontiguousarray(a[::-1])[::-1]
    if layout == "every_other":                                # a strided view of a bigger buffer
        base = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        base[..., ::2] = a
        return base[..., ::2]
    t = torch.from_numpy(np.ascontiguousarray(a))
    if layout == "torch":
        return t
    base = torch.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=t.dtype)
    base[..., ::2] = t
    return base[..., ::2]


def _host(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def outcome(name: str, call):
    """("raised", exception type) or ("ok", result); anything else than ValueError/TypeError fails the test."""
    try:
        result = call()
    except DOCUMENTED as e:
        COUNTS[f"{name} raised"] += 1
        return "raised", type(e)
    COUNTS[f"{name} returned"] += 1
    return "ok", result


shapes = st.tuples(st.lists(st.integers(0, 3), max_size=2), st.sampled_from([0, 1, 16, 32, 48, 64, 96, 128]))


@settings(FUZZ, max_examples=150)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       type_name=st.sampled_from(TYPES + ["Q4_0", "q4_2", ""]), flavor=st.sampled_from(["ref", "cpu", "cuda", "x"]),
       seed=st.integers(0, 2 ** 32 - 1), specials=st.booleans())
def test_quantize_equals_the_contiguous_call(shape, dtype, layout, type_name, flavor, seed, specials):
    a = _values(seed, tuple(shape[0]) + (shape[1],), dtype, specials)
    x = in_layout(a, layout)
    before = _host(x).copy()
    got = outcome("quantize", lambda: kvlab.quantize(x, type_name, flavor))
    want = outcome("quantize (contiguous)", lambda: kvlab.quantize(np.ascontiguousarray(a), type_name, flavor))
    assert got[0] == want[0]
    if got[0] == "ok":
        assert _host(got[1].raw).tobytes() == want[1].raw.tobytes() and got[1].shape == want[1].shape
        assert type(got[1].raw) is (torch.Tensor if isinstance(x, torch.Tensor) else np.ndarray)
    else:
        assert got[1] is want[1]
    assert _host(x).tobytes() == before.tobytes()


@settings(FUZZ, max_examples=80)
@given(rows=st.integers(0, 4), cols=st.sampled_from([32, 64, 128]), type_name=st.sampled_from(TYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 32 - 1))
def test_dequantize_of_a_strided_raw_equals_the_contiguous_one(rows, cols, type_name, layout, seed):
    q = kvlab.quantize(_values(seed, (rows, cols), np.float32, True), type_name)
    raw = in_layout(q.raw, layout)
    got = outcome("dequantize", lambda: kvlab.dequantize(kvlab.QTensor(raw, type_name, (rows, cols))))
    assert got[0] == "ok"
    assert _host(got[1]).tobytes() == kvlab.dequantize(q).tobytes()


CACHE_LAYOUTS = ["C", "head_slice", "F", "reversed", "torch", "torch_head_slice", "torch_F"]


def _cache_view(owner, layout, row_bytes):
    """The cache's raw bytes inside `owner` (numpy or torch), as the layout places them."""
    if layout in ("head_slice", "torch_head_slice"):
        return owner[:, row_bytes:]
    if layout == "reversed":
        return owner[::-1]
    if layout == "torch_F":
        return owner.T
    return owner


def _owner(layout, n_rows, row_bytes, seed):
    fill = np.random.default_rng(seed).integers(0, 256, (n_rows, 2 * row_bytes), dtype=np.uint8)
    if layout in ("head_slice", "torch_head_slice"):
        owner = fill
    elif layout == "torch_F":
        owner = np.ascontiguousarray(fill[:, :row_bytes].T)         # (row_bytes, n_rows): .T is column-major
    else:
        owner = np.ascontiguousarray(fill[:, :row_bytes])
    if layout == "F":
        owner = np.asfortranarray(owner)
    return torch.from_numpy(owner) if layout.startswith("torch") else owner


@settings(FUZZ, max_examples=150)
@given(n_rows=st.integers(1, 6), row_len=st.sampled_from([32, 64]), type_name=st.sampled_from(TYPES),
       flavor=st.sampled_from(["ref", "cpu", "cuda"]), layout=st.sampled_from(CACHE_LAYOUTS),
       ids=st.lists(st.integers(-2, 7), max_size=7), id_dtype=st.sampled_from([np.int64, np.int32, np.uint8, np.float64]),
       ids_torch=st.booleans(), values_rows_delta=st.sampled_from([0, 0, 0, 1]),
       values_dtype=st.sampled_from([np.float32, np.float64, np.int32]), seed=st.integers(0, 2 ** 32 - 1))
def test_set_rows_writes_the_caller_buffer_or_refuses_untouched(n_rows, row_len, type_name, flavor, layout, ids,
                                                                id_dtype, ids_torch, values_rows_delta,
                                                                values_dtype, seed):
    rb = kvlab.TYPES[type_name].row_bytes(row_len)
    owner = _owner(layout, n_rows, rb, seed)
    owner_before = _host(owner).copy()
    cache = kvlab.QTensor(_cache_view(owner, layout, rb), type_name, (n_rows, row_len), flavor)
    row_ids = np.array(ids, dtype=np.int64).astype(id_dtype)   # uint8 wraps -1 to 255: out of range all the same
    values = _values(seed, (len(ids) + values_rows_delta, row_len), values_dtype, False)
    got = outcome("set_rows", lambda: kvlab.set_rows(cache, torch.from_numpy(row_ids) if ids_torch else row_ids,
                                                     values))
    valid = (row_ids.dtype.kind in "iu" or len(ids) == 0) and values_rows_delta == 0 \
        and values_dtype != np.int32 and len(set(row_ids.tolist())) == len(ids) \
        and all(0 <= i < n_rows for i in row_ids.tolist())
    expected = owner_before.copy()
    if got[0] == "ok":
        assert valid and got[1] is cache
        rows = kvlab.quantize(values.astype(np.float32), type_name, flavor).raw
        _cache_view(expected, layout, rb)[row_ids.astype(np.int64)] = rows
    else:
        assert not valid
    assert _host(owner).tobytes() == expected.tobytes()       # written in place, or not at all


@settings(FUZZ, max_examples=100)
@given(shape=shapes, n=st.sampled_from([True, 0, 1, 2, 3, 16, 32, 32, 64.0, -64, np.int64(16)]),
       dtype=st.sampled_from([np.float32, np.float32, np.float32, np.float64]), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2 ** 32 - 1))
def test_rotate_equals_the_contiguous_call(shape, n, dtype, layout, seed):
    a = _values(seed, tuple(shape[0]) + (shape[1],), dtype, True)
    got = outcome("rotate", lambda: kvlab.rotate(in_layout(a, layout), n))
    want = outcome("rotate (contiguous)", lambda: kvlab.rotate(np.ascontiguousarray(a), n))
    assert got[0] == want[0]
    if got[0] == "ok":
        assert _host(got[1]).tobytes() == want[1].tobytes()
    else:
        assert got[1] is want[1]


@settings(FUZZ, max_examples=40)
# head_dims past whole 64-value SIMD steps (32, 48, 96) too: the f16/bf16 K.Q's leftover loop, and
# 48 is refused for block types (a block would straddle two heads)
@given(head_dim=st.sampled_from([32, 48, 64, 96, 128, 192]), n_head_kv=st.integers(1, 2), group=st.integers(1, 2),
       n_kv=st.integers(0, 24), n_q=st.integers(1, 2), type_k=st.sampled_from(TYPES), type_v=st.sampled_from(TYPES),
       flavor=st.sampled_from(["ref", "cpu", "cuda"]), backend=st.sampled_from(["ref", "cpu", "cuda"]),
       rotation=st.booleans(), topk=st.integers(-1, 9), layouts=st.tuples(*[st.sampled_from(["C", "F", "reversed",
                                                                                            "torch"])] * 3),
       seed=st.integers(0, 2 ** 32 - 1))
def test_attention_error_equals_the_contiguous_call(head_dim, n_head_kv, group, n_kv, n_q, type_k, type_v, flavor,
                                                    backend, rotation, topk, layouts, seed):
    shapes_ = [(n_head_kv * group, n_q, head_dim), (n_head_kv, n_kv, head_dim), (n_head_kv, n_kv, head_dim)]
    arrays = [_values(seed + i, s, np.float32, False) for i, s in enumerate(shapes_)]
    args = dict(type_k=type_k, type_v=type_v, rotation=rotation, flavor=flavor, backend=backend, topk=topk)
    got = outcome("attention_error", lambda: kvlab.attention_error(
        *(in_layout(a, l) for a, l in zip(arrays, layouts)), **args))
    want = outcome("attention_error (contiguous)", lambda: kvlab.attention_error(*arrays, **args))
    assert got[0] == want[0]
    if got[0] == "ok":
        # the same values in new allocations: BLAS may take alignment-dependent paths, so not bytes
        assert got[1].keys() == want[1].keys()
        assert all(np.isclose(got[1][m], want[1][m], rtol=1e-9, atol=1e-15) for m in want[1])
    else:
        assert got[1] is want[1]


CORRUPT_SCRIPT = textwrap.dedent(r"""
    from collections import Counter
    import sys
    from hypothesis import HealthCheck, given, settings, strategies as st
    import numpy as np
    import kvlab

    COUNTS = Counter()
    TYPES = list(kvlab.TYPES)
    FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=int(sys.argv[1]),
                    suppress_health_check=list(HealthCheck))

    def run(name, call):
        try:
            call()
            COUNTS[name + " returned"] += 1
            return True
        except (ValueError, TypeError):
            COUNTS[name + " raised"] += 1
            return False

    @st.composite
    def raw_and_shape(draw):
        # a declared shape and a raw buffer that fits it, or one thing wrong with either
        type_name = draw(st.sampled_from(TYPES))
        lead = draw(st.lists(st.integers(0, 3), max_size=2))
        n = draw(st.sampled_from([0, 1, 16, 32, 64, 96]))
        shape, raw_shape = lead + [n], lead + [kvlab.TYPES[type_name].row_bytes(n)]
        dtype = np.uint8
        wrong = draw(st.sampled_from(["nothing", "nothing", "nothing", "row bytes", "lead", "ndim", "float",
                                      "bool", "negative", "dtype", "no dims"]))
        if wrong == "row bytes":
            raw_shape[-1] += draw(st.sampled_from([-1, 1, 2]))
        elif wrong == "lead":
            raw_shape[0] += 1
        elif wrong == "ndim":
            raw_shape = [1] + raw_shape
        elif wrong == "float":
            shape[-1] = shape[-1] + 0.5
        elif wrong == "bool":
            shape[0] = True
        elif wrong == "negative":
            shape[0] = -1
        elif wrong == "dtype":
            dtype = draw(st.sampled_from([np.int8, np.float32, np.uint16]))
        elif wrong == "no dims":
            shape = []
        return np.zeros([max(d, 0) for d in raw_shape], dtype), shape, type_name

    @FUZZ
    @given(case=raw_and_shape())
    def from_raw_then_kernels(case):
        raw, shape, type_name = case
        q = []
        if run("from_raw", lambda: q.append(kvlab.QTensor.from_raw(raw, type_name, shape))):
            q = q[0]
            assert q.raw.shape == q.shape[:-1] + (q.info.row_bytes(q.shape[-1]),)
            assert run("dequantize(valid)", lambda: kvlab.dequantize(q))
            if len(q.shape) >= 2 and q.shape[-2] > 0:
                assert run("set_rows(valid)", lambda: kvlab.set_rows(q, np.array([q.shape[-2] - 1]),
                                                                     np.ones(q.shape[:-2] + (1, q.shape[-1]), np.float32)))

    @FUZZ
    @given(type_name=st.sampled_from(TYPES), rows=st.integers(1, 4), field=st.sampled_from(["raw", "shape", "type"]),
           raw_rows=st.integers(0, 8), raw_bytes=st.integers(0, 200), shape=st.tuples(st.integers(0, 8),
                                                                                     st.integers(0, 512)),
           other_type=st.sampled_from(TYPES))
    def corrupted_into_kernels(type_name, rows, field, raw_rows, raw_bytes, shape, other_type):
        q = kvlab.quantize(np.ones((rows, 64), np.float32), type_name)
        new = {"raw": np.zeros((raw_rows, raw_bytes), np.uint8), "shape": shape, "type": other_type}[field]
        object.__setattr__(q, field, new)            # what a frozen dataclass does not stop
        intact = q.raw.shape == tuple(q.shape[:-1]) + (kvlab.TYPES[q.type].row_bytes(q.shape[-1]),) \
            and q.shape[-1] % kvlab.TYPES[q.type].block_size == 0
        assert run("dequantize(corrupted)", lambda: kvlab.dequantize(q)) == intact
        assert run("set_rows(corrupted)", lambda: kvlab.set_rows(q, np.array([0]), np.ones((1, q.shape[-1]),
                                                                                               np.float32))) \
            == (intact and q.shape[0] > 0)

    from_raw_then_kernels()
    corrupted_into_kernels()
    print(dict(sorted(COUNTS.items())))
""")


def test_corrupted_qtensors_never_reach_a_kernel_in_a_subprocess():
    res = subprocess.run([sys.executable, "-c", CORRUPT_SCRIPT, "150"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]           # a segfault or an abort is a non-zero code
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    counts = eval(res.stdout.strip().splitlines()[-1], {})
    COUNTS.update({f"subprocess {k}": v for k, v in counts.items()})
    assert counts["dequantize(corrupted) raised"] > 0 and counts["dequantize(valid) returned"] > 0
