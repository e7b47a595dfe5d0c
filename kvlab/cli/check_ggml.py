"""`kvlab check-ggml`: hold a real libggml against kvlab (kvlab.ggml.check says what is compared)."""
import json
import time

from kvlab.cli.options import UsageError, add_command
from kvlab.ggml.check import (check_bytes, check_fa, check_split, fa_cases, fa_report, fa_text, input_cases,
                               known_drift)
from kvlab.ggml.fa import cpu_features, llama_lib
from kvlab.ggml.lib import find_lib_dir, load


def register(subparsers) -> None:
    p = add_command(subparsers, "check-ggml",
                    help="hold a real libggml against kvlab: bytes, split states, flash attention",
                    description="Compare a real libggml with kvlab: the bytes of every type and path, the split "
                                "state of every node of the attention block, and ggml-cpu's flash attention on "
                                "every K/V pair. Exit 1 when anything differs.")
    p.add_argument("--lib", metavar="PATH",
                   help="libggml-base.so or its directory (default: KVLAB_GGML_LIB, then ggml-python's; the "
                        "flash-attention check then takes llama-cpp-python's, see kvlab.ggml.fa.llama_lib)")
    p.add_argument("--era", choices=("flatten", "pr23225", "pr23792"),
                   help="kvlab's rule set to compare with (default: from the library's split-state layout)")
    p.add_argument("--format", choices=("text", "json"), default="text", help="json: one object with every result")
    p.set_defaults(run=run_check)


def run_check(args) -> int:
    t0 = time.perf_counter()
    try:
        lib_dir = find_lib_dir(args.lib)
        ggml_lib = load(lib_dir)
    except (OSError, RuntimeError) as e:   # FileNotFoundError is an OSError
        raise UsageError(f"--lib: {e}") from None
    cases = input_cases()
    byte_rows = check_bytes(ggml_lib, cases)
    layout, era, results = check_split(lib_dir, args.era)
    why, drift = known_drift(ggml_lib.version, era)
    fa_lib = ggml_lib if args.lib else llama_lib()   # the ggml llama.cpp 0.3.36 runs, unless one is named
    fa = fa_report(check_fa(fa_lib, fa_cases()), cpu_features(fa_lib))
    report = {
        "library": str(lib_dir), "version": ggml_lib.version, "split_state_layout": layout, "era": era,
        "bytes": [r.__dict__ for r in byte_rows], "input_cases": len(cases),
        "split": [{"config": r.config.id, "compared": r.compared, "agrees": r.agrees,
                   "differences": r.differences, "ggml_stop": r.ggml_stop, "kvlab_stop": r.kvlab_stop,
                   "known_drift": why if not r.agrees and r.config.id in drift else ""}
                  for r in results],
        "flash_attn": fa, "flash_attn_library": str(fa_lib.lib_dir), "flash_attn_version": fa_lib.version,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    different = sum(r.differ > 0 for r in byte_rows) + sum(not r.agrees for r in results) + len(fa["failed"])
    report["ok"] = different == 0
    print(json.dumps(report, indent=1) if args.format == "json" else _text(report))
    return 0 if different == 0 else 1


def _text(rep: dict) -> str:
    nr = "with nr (PR #23792)" if rep["split_state_layout"] == "nr" else "without nr (pre-#23792)"
    out = [f"ggml {rep['version']} in {rep['library']}",
           f"split-state struct: {nr}; compared with kvlab era {rep['era']!r}", "",
           f"bytes ({rep['input_cases']} input cases)", f"  {'type':<8}{'path':<10}{'blocks':>8}{'differ':>8}"]
    for r in rep["bytes"]:
        out.append(f"  {r['type']:<8}{r['path']:<10}{r['blocks']:>8}{r['differ']:>8}  {r['first']}".rstrip())
    split = rep["split"]
    agree = sum(r["agrees"] for r in split)
    out += ["", f"split states: {agree} of {len(split)} configurations agree "
                f"({sum(r['compared'] for r in split)} node states compared)",
            f"  {'configuration':<30}{'nodes':>6}  {'result':<8} stops (ggml | kvlab)"]
    for r in split:
        stops = f"{r['ggml_stop'] or '-'} | {r['kvlab_stop'] or '-'}" if r["ggml_stop"] or r["kvlab_stop"] else ""
        result = "agree" if r["agrees"] else "drift" if r["known_drift"] else "DIFFER"
        out.append(f"  {r['config']:<30}{r['compared']:>6}  {result:<8} {stops}".rstrip())
        out += [f"      {d}" for d in r["differences"]]
    bad_bytes = sum(r["differ"] > 0 for r in rep["bytes"])
    drifted = [r for r in split if r["known_drift"]]
    if drifted:
        out += ["", f"known version drift ({len(drifted)} configurations): {drifted[0]['known_drift']}"]
    out += ["", f"flash attention against ggml {rep['flash_attn_version']} in {rep['flash_attn_library']}"]
    out += fa_text(rep["flash_attn"])
    out += ["", f"{'OK' if rep['ok'] else 'DIFFERENCES'}: {bad_bytes} byte paths differ, "
                f"{len(split) - agree} configurations differ, {len(drifted)} of them known version drift, "
                f"{len(rep['flash_attn']['failed'])} flash-attention runs outside the bound ({rep['seconds']} s)"]
    return "\n".join(out)
