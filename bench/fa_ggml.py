"""ggml-cpu's flash_attn_ext against kvlab's cpu backend over the broad matrix, one JSON line per case.

    python bench/fa_ggml.py [--lib DIR] [--head-dims 64,128,256] [--layouts mha,gqa,mqa]
                            [--tokens 1,7,64] [--contexts 32,300,4096] [--threads 1] [--seed 0]

Every case (head_dim x layout x batch x context x rotation on/off x ggml threads; more than one thread
takes ggml's split-KV path for an f16 decode over >= 512 cells) runs all 81 K/V pairs through
kvlab.ggml.check.check_fa: the real op on kvlab's cache bytes against kvlab.accuracy's model of it.
Each line: the case, how many pairs are bit-exact, the largest |diff| and ulp distance, the smallest
quantization error (out_rel_l2) and the worst ratio quantization error / difference (null: all
bit-exact). The last line sums up (bit-exact count, worst ratio, the library's SIMD features).
`kvlab check-ggml` and tests/ggml/test_ggml_fa.py run the small matrix (kvlab.ggml.check.fa_cases).
"""
import argparse
import json
import time

from kvlab.ggml.check import FA_LAYOUTS, FACase, check_fa, fa_report
from kvlab.ggml.fa import cpu_features, llama_lib
from kvlab.ggml.lib import find_lib_dir, load


def ints(text: str) -> list:
    return [int(x) for x in text.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", help="directory of libggml-base.so / libggml-cpu.so (default: kvlab.ggml.fa.llama_lib: KVLAB_GGML_LIB, "
                                    "then llama-cpp-python's, then ggml-python's)")
    ap.add_argument("--head-dims", type=ints, default=[64, 128, 256])
    ap.add_argument("--layouts", type=lambda s: s.split(","), default=list(FA_LAYOUTS))
    ap.add_argument("--tokens", type=ints, default=[1, 7, 64])
    ap.add_argument("--contexts", type=ints, default=[32, 300, 4096])
    ap.add_argument("--threads", type=ints, default=[1])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lib = load(find_lib_dir(args.lib)) if args.lib else llama_lib()
    all_rows = []
    for d in args.head_dims:
        for layout in args.layouts:
            for t in args.tokens:
                for n_kv in args.contexts:
                    for rotation, threads in ((r, n) for r in (True, False) for n in args.threads):
                        t0 = time.perf_counter()
                        rows = check_fa(lib, [FACase(d, layout, t, n_kv, rotation, threads)], seed=args.seed)
                        all_rows += rows
                        rep = fa_report(rows, {})
                        print(json.dumps({
                            "case": rows[0].case, "pairs": len(rows), "bit_exact": rep["bit_exact"],
                            "paths": {k: v["rows"] for k, v in rep["paths"].items()},
                            "max_abs": max(r.max_abs for r in rows), "max_ulp": max(r.max_ulp for r in rows),
                            "min_quant_rel_l2": min(r.quant_rel_l2 for r in rows),
                            "worst_ratio": rep["worst_ratio"], "seconds": round(time.perf_counter() - t0, 2)}),
                            flush=True)
    rep = fa_report(all_rows, cpu_features(lib))
    print(json.dumps({"summary": True, "library": str(lib.lib_dir), "version": lib.version,
                      "compared": rep["compared"], "bit_exact": rep["bit_exact"], "worst_ratio": rep["worst_ratio"],
                      "paths": rep["paths"], "cpu_features": rep["cpu_features"],
                      "modelled_isa": rep["modelled_isa"], "failed": rep["failed"][:20]}))


if __name__ == "__main__":
    main()
