"""Fork and thread safety of the parallel kernels (issue 16): numba's threading layer is chosen by kvlab.

Each case runs in a subprocess, so an abort ("fork() called from a process already using GNU OpenMP",
a workqueue layer entered by two threads) or a hung pool fails the test instead of killing pytest.
"""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(r"""
    import multiprocessing, sys, threading
    import numpy as np
    import numba
    import kvlab
    from kvlab import _threads

    x = np.random.default_rng(0).standard_normal((512, 128)).astype(np.float32)
    TYPES = ("q4_0", "q8_0", "iq4_nl", "q5_1", "f16")
    # the parent uses every kernel kind first: quantize, dequantize, rotate
    want = {t: (kvlab.quantize(x, t).raw.tobytes(), kvlab.dequantize(kvlab.quantize(x, t)).tobytes()) for t in TYPES}
    want_rot = kvlab.rotate(x, 128).tobytes()
    q3, k3, v3 = kvlab.synthetic_kv(64, kvlab.SyntheticConfig(n_q=2, head_dim=128))
    attention = lambda: kvlab.attention_error(q3, k3, v3, "q4_0", "f16", backend="cpu")   # cpu_fa's kernels
    want_attention = attention()

    def check(i):
        t = TYPES[i % len(TYPES)]
        q = kvlab.quantize(x, t)
        got = (q.raw.tobytes(), kvlab.dequantize(q).tobytes())
        return got == want[t] and kvlab.rotate(x, 128).tobytes() == want_rot and attention() == want_attention

    with multiprocessing.get_context("fork").Pool(2) as pool:
        forked = pool.map(check, range(10), chunksize=1)
    results = []
    def worker(start):
        results.extend(check(start + i) for i in range(10))
    threads = [threading.Thread(target=worker, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("layer", numba.threading_layer(), _threads.LAYER)
    print("fork", len(forked), all(forked))
    print("threads", len(results), all(results))
""")


def _run(layer=None):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if layer:
        env["NUMBA_THREADING_LAYER"] = layer
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.split("\n")
    return lines[0].split()[1:], lines[1], lines[2]


def test_kvlab_takes_tbb_and_survives_fork_and_threads():
    layers, fork, threads = _run()
    assert layers == ["tbb", "tbb"]
    assert fork == "fork 10 True" and threads == "threads 40 True"


def test_without_tbb_the_workqueue_layer_is_serialized():
    """kvlab's fallback where TBB is missing: workqueue (fork-safe), one kernel at a time (numba alone
    aborts when two threads enter it). Chosen here through NUMBA_THREADING_LAYER, which kvlab keeps."""
    layers, fork, threads = _run("workqueue")
    assert layers == ["workqueue", "workqueue"]
    assert fork == "fork 10 True" and threads == "threads 40 True"


def test_the_fallback_is_workqueue_when_tbb_does_not_load(monkeypatch):
    import numba
    from kvlab import _threads
    monkeypatch.setattr(_threads, "_tbb_paths", lambda: ["/nonexistent/libtbb.so.12"])
    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    monkeypatch.setattr(numba.config, "THREADING_LAYER", numba.config.THREADING_LAYER)   # restored after
    assert not _threads.load_tbb()
    assert _threads.choose_layer() == "workqueue" == numba.config.THREADING_LAYER
    monkeypatch.setenv("NUMBA_THREADING_LAYER", "omp")
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "omp")
    assert _threads.choose_layer() == "omp"        # a layer the user chose is kept
