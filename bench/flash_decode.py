"""Flash decoding over ggml bytes (kvlab.flash): GPU kernel bandwidth, HF decode speed, CPU decode speed.
One JSON line per figure; a figure that fails prints a line with "error" and the others still run.

    python bench/flash_decode.py                 # everything the machine can run (GPU parts need CUDA)
    python bench/flash_decode.py --parts cpu     # kernel, hf, cpu: any subset, comma separated

kernel (GPU): a Llama-3-8B-like attention layer (32 query heads, 8 KV heads, head_dim 128) at contexts
    4k..32k for the default GGML_CUDA_FA_QUANTS pairs (+ every type at 32k; --kernel-pairs: those at every
    context; --k-groups, --registers: kernel variants side by side), over enough sequences that
    K+V exceed the L2 (512 MiB at f16): time per launch of the partials + combine kernels enqueued back
    to back (CUDA events, L2 flushed first), K+V bytes read / time against the same run's torch copy_
    bandwidth ((read + written) / time of a 1 GiB copy). Goal (issue 18): >= 0.80 at 32k. First-call
    (compile) time and the whole Python call at batch 1 reported on their own.
hf (GPU): a 1B-class random Llama (Llama-3.2-1B's shape) in bf16, a 32k-token context prefilled in 4k
    chunks, then greedy decode steps timed: tokens/s with GGMLQuantizedCache(storage="bytes") q4_0/q4_0
    and the kvlab_ggml_bytes attention vs DynamicCache with sdpa. Goal: bytes >= DynamicCache. Beside them
    transformers' QuantizedCache (quanto, hqq; 4-bit, --peers) where those packages install.
cpu: a small random Llama (4 layers, 8 heads, 2 KV heads, head_dim 64) in float32 on the CPU, 2k context,
    decode tokens/s with the bytes storage vs today's floats storage (sdpa on the dequantized copy), same
    pair. Goal: bytes within 1.5x of floats (ratio floats_tps / bytes_tps <= 1.5).
"""
import argparse
import json
import statistics
import time
import traceback

PAIRS_GPU = ("q4_0/q4_0", "q8_0/q8_0", "f16/f16", "bf16/bf16")
PLAIN = ("f32", "f16", "bf16")
ALL_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def guarded(base: dict, fn) -> None:
    """Run one figure; print its row, or the row with the error."""
    try:
        row = fn()
        emit({**base, **row})
    except Exception as e:  # noqa: BLE001 - one failing figure must not stop the others
        emit({**base, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)[-800:]})


# ---- kernel --------------------------------------------------------------------------------------
def copy_bandwidth(torch, dev) -> float:
    """(bytes read + written) / s of a 1 GiB torch copy_, median of 10."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times[1:])


def launch_seconds(torch, launch, repeat: int) -> float:
    """Seconds per launch: `repeat` launches enqueued back to back between two CUDA events."""
    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(repeat):
        launch()
    e.record()
    e.synchronize()
    return a.elapsed_time(e) / 1e3 / repeat


def host_seconds(torch, call, n: int = 100) -> float:
    """Host seconds per call: n calls enqueued without a sync (the GPU queue absorbs them), median of 3."""
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        times.append((time.perf_counter() - t0) / n)
    torch.cuda.synchronize()
    return statistics.median(times)


def kernel_figure(torch, dev, pair: str, n_kv: int, copy_bw: float, flush, batch: int, repeat: int = 10) -> dict:
    """Kernel time: `batch` sequences (or layers) of one layer's K/V, launches enqueued back to back
    between two CUDA events after an L2 flush (kernels only: kvlab.kernels.cuda.flash_decode.launcher);
    the full Python call (kernels.cuda.flash_decode, batch 1) timed on its own: with a sync
    (call_seconds_batch1) and its host time alone (call_host_seconds_batch1, calls enqueued back to back).
    out_sha256: the first sequence's output bytes (equal across variants: the same bits)."""
    import hashlib
    import kvlab
    from kvlab.kernels.cuda import flash_decode as fd
    type_k, type_v = pair.split("/")
    ik, iv = kvlab.types.type_info(type_k), kvlab.types.type_info(type_v)
    h, hkv, d = 32, 8, 128
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(batch, h, d, device=dev, generator=gen)
    k_raw = torch.empty(batch, hkv, n_kv, ik.row_bytes(d), dtype=torch.uint8, device=dev)
    v_raw = torch.empty(batch, hkv, n_kv, iv.row_bytes(d), dtype=torch.uint8, device=dev)
    for i in range(batch):                          # quantized one sequence at a time (bounded float memory)
        k_raw[i] = kvlab.quantize(torch.randn(hkv, n_kv, d, device=dev, generator=gen), type_k).raw
        v_raw[i] = kvlab.quantize(torch.randn(hkv, n_kv, d, device=dev, generator=gen), type_v).raw
    scale = 1.0 / d ** 0.5
    t0 = time.perf_counter()
    launch, out = fd.launcher(q, k_raw, v_raw, ik.ggml_type, iv.ggml_type, None, scale)
    launch()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    flush()
    t = launch_seconds(torch, launch, repeat)
    read = k_raw.numel() + v_raw.numel()
    t_call = []

    def call():                                     # the whole Python call, as attention makes it
        return fd.flash_decode(q[:1], k_raw[:1], v_raw[:1], ik.ggml_type, iv.ggml_type, None, scale)
    for _ in range(5):
        s0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        t_call.append(time.perf_counter() - s0)
    t_host = host_seconds(torch, call)
    # on the device, against exact attention on the dequantized cache (first sequence)
    launch()
    kd = kvlab.dequantize(kvlab.QTensor.from_raw(k_raw[0], type_k, (hkv, n_kv, d))).double()
    vd = kvlab.dequantize(kvlab.QTensor.from_raw(v_raw[0], type_v, (hkv, n_kv, d))).double()
    qg = q[0].double().reshape(hkv, h // hkv, d)
    p = torch.softmax(qg @ kd.transpose(-1, -2) * scale, dim=-1)
    exact = (p @ vd).reshape(h, d)
    err = float((out[0].double() - exact).norm() / exact.norm())
    layout = fd.layout(ik.ggml_type, iv.ggml_type, d, fd.cols_per_block(h // hkv, d, iv.ggml_type), fd.VARIANT)
    return {"batch": batch, "seconds": t, "first_call_seconds": first, "kv_bytes": read,
            "read_GBps": read / t / 1e9, "copy_GBps": copy_bw / 1e9, "fraction_of_copy": read / t / copy_bw,
            "call_seconds_batch1": statistics.median(t_call), "call_host_seconds_batch1": t_host,
            "variant": list(fd.VARIANT), "prefetch": fd.prefetch_mode(ik.ggml_type, iv.ggml_type),
            **{k.lower(): layout[k] for k in ("MAX_REGISTERS", "STAGE_K", "STAGE_V", "NB", "DYN_BYTES")},
            "out_sha256": hashlib.sha256(out[0].cpu().numpy().tobytes()).hexdigest()[:16],
            "splits": fd.plan(batch * h // fd.cols_per_block(h // hkv, d, iv.ggml_type), n_kv,
                              torch.cuda.get_device_properties(dev).multi_processor_count)[0],
            "rel_l2_vs_exact_on_cache": err}


def _warm_one(job) -> float:
    """Compile (or load from numba's disk cache) the kernels one pair (and variant) needs: quantize,
    partials, combine."""
    pair, d, gqa, knobs = job
    import torch
    import kvlab
    from kvlab.kernels.cuda import flash_decode as fd
    fd.VARIANT = with_knobs(fd.VARIANT, knobs)
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    type_k, type_v = pair.split("/")
    k = kvlab.quantize(torch.randn(1, 1, 256, d, device=dev), type_k).raw
    v = kvlab.quantize(torch.randn(1, 1, 256, d, device=dev), type_v).raw
    fd.flash_decode(torch.zeros(1, gqa, d, device=dev), k, v, kvlab.types.type_info(type_k).ggml_type,
                    kvlab.types.type_info(type_v).ggml_type, None, 1.0, splits=2)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def with_knobs(variant: tuple, knobs: tuple) -> tuple:
    """fd.VARIANT (max registers, V steps, plain-K groups, staged V) with knobs, the same four fields, put in
    (None: as it is; registers 0: no limit)."""
    return tuple(v if k is None else k for v, k in zip(variant, knobs))


def warm_kernels(jobs, d: int, gqa: int) -> dict:
    """Every (pair, K groups) case's kernels compiled at once in their own processes (numba compiles one
    kernel on one core for tens of seconds); the figures then load them from the disk cache."""
    import multiprocessing
    import os
    t0 = time.perf_counter()
    jobs = [(p, d, gqa, kg) for p, kg in dict.fromkeys(jobs)]
    with multiprocessing.get_context("spawn").Pool(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        each = pool.map(_warm_one, jobs)
    return {"figure": "kernel_compile", "pairs": len(jobs), "seconds": time.perf_counter() - t0,
            "slowest_pair_seconds": max(each)}


def run_kernel(args) -> None:
    import torch
    dev = torch.device("cuda")
    flush_buf = torch.empty(1 << 26, dtype=torch.float32, device=dev)   # 256 MiB > the H200's 60 MB L2

    def flush():
        flush_buf.zero_()

    base = {"figure": "flash_decode_kernel", "device": torch.cuda.get_device_name(dev), "n_head": 32,
            "n_head_kv": 8, "head_dim": 128}
    copy_bw = None
    try:
        copy_bw = copy_bandwidth(torch, dev)
        emit({**base, "figure": "copy_bandwidth", "copy_GBps": copy_bw / 1e9})
    except Exception as e:  # noqa: BLE001
        emit({**base, "figure": "copy_bandwidth", "error": f"{type(e).__name__}: {e}"})
        return
    contexts = [int(n) for n in args.kernel_contexts.split(",")]
    if args.kernel_pairs:                               # the chosen pairs at every context
        cases = [(p, n) for p in args.kernel_pairs.split(",") for n in contexts]
    else:
        cases = [(p, n) for p in PAIRS_GPU for n in contexts]
        cases += [(f"{t}/{t}", max(contexts)) for t in ALL_TYPES if f"{t}/{t}" not in PAIRS_GPU]
    def knob(text, parse=int):
        return [parse(x) for x in text.split(",")] if text else [None]
    cases = [(p, n, (r, nb, kg if p.split("/")[0] in PLAIN else None, sv))
             for p, n in cases for r in knob(args.registers) for nb in knob(args.v_steps)
             for kg in knob(args.k_groups) for sv in knob(args.stage_v, lambda x: bool(int(x)))]
    cases = list(dict.fromkeys(cases))                  # quantized K: one case whatever the K groups
    guarded(base, lambda: warm_kernels([(p, kg) for p, _, kg in cases], 128, 4))
    from kvlab.kernels.cuda import flash_decode as fd
    default = fd.VARIANT
    for pair, n_kv, knobs in cases:
        batch = max(1, (1 << 29) // (8 * n_kv * 128 * 2))     # >= 512 MiB of K+V at f16: well past the L2
        fd.VARIANT = with_knobs(default, knobs)
        try:
            guarded({**base, "pair": pair, "n_kv": n_kv, "goal": 0.80},
                    lambda: kernel_figure(torch, dev, pair, n_kv, copy_bw, flush, batch))
        finally:
            fd.VARIANT = default


# ---- HF decode -----------------------------------------------------------------------------------
def decode_tps(model, cache, torch, dev, context: int, steps: int, chunk: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen).to(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, context, chunk):
            out = model(ids[:, s:s + chunk], cache=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize() if dev.type == "cuda" else None
        prefill = time.perf_counter() - t0
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize() if dev.type == "cuda" else None
            times.append(time.perf_counter() - t)
    warm = times[2:] if len(times) > 4 else times
    return {"prefill_seconds": prefill, "decode_step_seconds": statistics.median(warm),
            "tokens_per_s": 1.0 / statistics.median(warm), "first_step_seconds": times[0]}


def llama(torch, dev, dtype, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=65536, **shape)
    return LlamaForCausalLM(config).to(device=dev, dtype=dtype).eval()


def run_hf(args) -> None:
    import torch
    from transformers import DynamicCache
    from kvlab.hf.bytes_attention import use_bytes_attention
    from kvlab.hf.cache import GGMLQuantizedCache
    dev = torch.device("cuda")
    base = {"figure": "hf_decode", "device": torch.cuda.get_device_name(dev), "model": "random Llama-3.2-1B shape",
            "dtype": "bfloat16", "context": args.context}
    try:
        model = llama(torch, dev, torch.bfloat16, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    except Exception as e:  # noqa: BLE001
        emit({**base, "error": f"{type(e).__name__}: {e}"})
        return
    results = {}

    def dynamic():
        model.set_attn_implementation("sdpa")
        r = decode_tps(model, DynamicCache(config=model.config), torch, dev, args.context, args.steps, 4096)
        results["dynamic"] = r["tokens_per_s"]
        return {"cache": "DynamicCache", "attention": "sdpa", **r}

    def bytes_only():
        use_bytes_attention(model)
        cache = GGMLQuantizedCache(model.config, "q4_0", "q4_0", storage="bytes", max_cache_len=args.context + 64)
        r = decode_tps(model, cache, torch, dev, args.context, args.steps, 4096)
        results["bytes"] = r["tokens_per_s"]
        return {"cache": "GGMLQuantizedCache(storage='bytes')", "pair": "q4_0/q4_0",
                "attention": "kvlab_ggml_bytes", **r}

    def peer(backend):
        def figure():   # transformers' own 4-bit cache (dequantizes all of it at every step), sdpa
            from transformers import QuantizedCache
            model.set_attn_implementation("sdpa")
            axes = dict(axis_key=0, axis_value=0) if backend == "quanto" else dict(axis_key=1, axis_value=1)
            r = decode_tps(model, QuantizedCache(backend, model.config, nbits=4, **axes), torch, dev, args.context,
                           min(args.steps, 8), 4096)
            return {"cache": f"QuantizedCache({backend!r}, nbits=4)", "attention": "sdpa", **r}
        return figure

    guarded(base, dynamic)
    torch.cuda.empty_cache()
    guarded(base, bytes_only)
    for backend in filter(None, args.peers.split(",")):
        torch.cuda.empty_cache()
        guarded(base, peer(backend))
    if len(results) == 2:
        emit({**base, "figure": "hf_decode_ratio", "bytes_over_dynamic_tps": results["bytes"] / results["dynamic"],
              "goal": ">= 1.0", "met": results["bytes"] >= results["dynamic"]})


# ---- CPU decode ----------------------------------------------------------------------------------
def run_cpu(args) -> None:
    import torch
    from kvlab.hf.bytes_attention import use_bytes_attention
    from kvlab.hf.cache import GGMLQuantizedCache
    dev = torch.device("cpu")
    base = {"figure": "cpu_decode", "model": "random Llama, 4 layers, 8 heads, 2 KV heads, head_dim 64",
            "dtype": "float32", "context": args.cpu_context, "pair": args.cpu_pair,
            "threads": torch.get_num_threads()}
    model = llama(torch, dev, torch.float32, vocab_size=4096, hidden_size=512, intermediate_size=1024,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    type_k, type_v = args.cpu_pair.split("/")
    tps = {}

    def storage(kind, attention):
        def figure():
            if attention == "sdpa":
                model.set_attn_implementation("sdpa")
            else:
                use_bytes_attention(model)
            r = decode_tps(model, GGMLQuantizedCache(model.config, type_k, type_v, storage=kind), torch, dev,
                           args.cpu_context, args.steps, 512)
            tps[kind, attention] = r["tokens_per_s"]
            return {"storage": kind, "attention": attention, **r}
        return figure

    # floats: the float copy read by sdpa; bytes: flash decoding over the rows; bytes under sdpa: the default
    # storage read by a model left on its own attention (every row dequantized at each step)
    for kind, attention in (("floats", "sdpa"), ("bytes", "kvlab_ggml_bytes"), ("bytes", "sdpa")):
        guarded(base, storage(kind, attention))
    if ("floats", "sdpa") in tps and ("bytes", "kvlab_ggml_bytes") in tps:
        ratio = tps["floats", "sdpa"] / tps["bytes", "kvlab_ggml_bytes"]
        emit({**base, "figure": "cpu_decode_ratio", "floats_over_bytes_time": ratio, "goal": "<= 1.5",
              "met": ratio <= 1.5})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="kernel,hf,cpu")
    parser.add_argument("--context", type=int, default=32768, help="HF decode context (GPU)")
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed")
    parser.add_argument("--cpu-context", type=int, default=2048)
    parser.add_argument("--cpu-pair", default="q4_0/q4_0")
    parser.add_argument("--kernel-pairs", default="", help="only these K/V pairs in the kernel part, at every "
                        "context")
    parser.add_argument("--k-groups", default="", help="f32/f16/bf16 K: each of these counts of 8-value groups "
                        "loaded together (the kernel variant's third field; default: the module's)")
    parser.add_argument("--registers", default="", help="each of these register limits of the kernel (the "
                        "variant's first field, 0: none; default: the module's)")
    parser.add_argument("--v-steps", default="", help="each of these counts of V steps whose loads are issued "
                        "together (the variant's second field; default: the module's)")
    parser.add_argument("--stage-v", default="", help="V rows staged in shared memory: each of 0, 1 (the variant's "
                        "fourth field; default: the module's, by type)")
    parser.add_argument("--peers", default="quanto,hqq", help="transformers QuantizedCache backends in the hf part "
                        "(where optimum-quanto / hqq install; '' for none)")
    parser.add_argument("--kernel-contexts", default="4096,8192,16384,32768",
                        help="contexts of the kernel part (every type runs at the largest)")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    gpu = False
    try:
        import torch
        gpu = torch.cuda.is_available()
    except ImportError:
        pass
    for part, fn, needs_gpu in (("kernel", run_kernel, True), ("hf", run_hf, True), ("cpu", run_cpu, False)):
        if part not in parts:
            continue
        if needs_gpu and not gpu:
            emit({"figure": part, "skipped": "no CUDA device"})
            continue
        t0 = time.perf_counter()
        try:
            fn(args)
        except Exception as e:  # noqa: BLE001
            emit({"figure": part, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)[-800:]})
        emit({"figure": "part_seconds", "part": part, "seconds": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
