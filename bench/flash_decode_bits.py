"""flash_decode's output bits of two kernel trees on the same bytes (needs a CUDA GPU; prints JSON lines).

A kernel change that only moves loads, registers or instructions must leave every output bit as it was;
this runs the same cases through two trees' kvlab.kernels.cuda.flash_decode and counts differing values.

    python bench/flash_decode_bits.py tree REV DIR          # DIR/kvlab: this kvlab with REV's kernels/
                                                            # (REV from this checkout's git: on a machine
                                                            # whose copy lacks it, build DIR here, carry it)
    python bench/flash_decode_bits.py make IN.npz           # the cases' Q and K/V bytes (seeded)
    PYTHONPATH=DIR python bench/flash_decode_bits.py run IN.npz OUT.npz [I N]   # cases I::N (processes
                                                            # at once: numba compiles a kernel per core)
    python bench/flash_decode_bits.py cmp A.npz[,A2.npz..] B.npz[,B2.npz..]

Cases: every type as K and V at D 128, GQA 4 (32 / 8 heads), 4,133 cells (a partial last tile), one
all-zero K block and one outlier of 300; mixed pairs q8_0/q4_0, f16/q4_0, q4_0/f16, q5_1/iq4_nl; GQA 1
masked in 3 splits (q4_0, f16); D 64 and 256 (q4_0, q8_0, f16). f32/f16/bf16 K also with every count of
K groups loaded together (VARIANT's third field; a tree without one is skipped for it). `cmp` compares
each case of A with B's same case (B's default variant where B lacks the variant) and with A's own default.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]
PLAIN = ("f32", "f16", "bf16")
ROOT = Path(__file__).resolve().parents[1]


def cases() -> list:
    """(name, D, H, Hkv, L, type_k, type_v, masked, splits); splits None: the kernel's own plan."""
    out = [(f"d128g4:{t}/{t}", 128, 32, 8, 4133, t, t, False, None) for t in TYPES]
    out += [(f"d128g4:{k}/{v}", 128, 32, 8, 4133, k, v, False, None)
            for k, v in (("q8_0", "q4_0"), ("f16", "q4_0"), ("q4_0", "f16"), ("q5_1", "iq4_nl"))]
    out += [(f"d128g1m:{t}/{t}", 128, 8, 8, 700, t, t, True, 3) for t in ("q4_0", "f16")]
    out += [(f"d{d}g4:{t}/{t}", d, 8, 2, 1500, t, t, False, None) for d in (64, 256) for t in ("q4_0", "q8_0", "f16")]
    return out


def tree(rev: str, dest: str) -> None:
    """dest/kvlab: this checkout's kvlab package with kernels/ as of git revision rev (the layout an
    installed kvlab has: kernels/ is kvlab.kernels)."""
    dest = Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT / "kvlab", dest / "kvlab")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "kernels"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    (dest / "kernels").rename(dest / "kvlab" / "kernels")


def make(path: str) -> None:
    import kvlab
    rng = np.random.default_rng(7)
    arrays = {}
    for name, d, h, hkv, n_kv, tk, tv, _, _ in cases():
        q = rng.standard_normal((1, h, d)).astype(np.float32)                  # (B, H, D)
        k = (rng.standard_normal((1, hkv, n_kv, d)) * 3).astype(np.float32)    # (B, Hkv, L, D)
        v = rng.standard_normal((1, hkv, n_kv, d)).astype(np.float32)
        k[0, 0, 5, :32] = 0                                                    # an all-zero block
        k[0, 0, 9, 3] = 300.0                                                  # one outlier
        arrays["q/" + name] = q
        arrays["k/" + name] = np.asarray(kvlab.quantize(k, tk).raw)            # (B, Hkv, L, row bytes)
        arrays["v/" + name] = np.asarray(kvlab.quantize(v, tv).raw)
        arrays["mask/" + name] = rng.random((1, n_kv)) > 0.3                   # (B, L)
    np.savez(path, **arrays)


def run(inp: str, outp: str, first: int = 0, step: int = 1) -> None:
    from numba import cuda
    from kvlab.kernels.cuda import flash_decode as fd
    from kvlab.types import type_info
    data = np.load(inp)
    out = {}
    default = fd.VARIANT
    for name, _, _, _, _, tk, tv, masked, splits in cases()[first::step]:
        def call():
            return fd.flash_decode(cuda.to_device(data["q/" + name]), cuda.to_device(data["k/" + name]),
                                   cuda.to_device(data["v/" + name]), type_info(tk).ggml_type,
                                   type_info(tv).ggml_type, data["mask/" + name] if masked else None,
                                   np.float32(0.125), splits).copy_to_host()       # (B, H, D)
        out[name] = call()
        if tk in PLAIN and name.startswith("d128g4"):
            for kg in (0, 1, 2, 4):
                if kg == default[2]:
                    continue
                fd.VARIANT = (*default[:2], kg, *default[3:])
                try:
                    out[f"{name}/kg{kg}"] = call()
                except Exception as e:  # noqa: BLE001 - an older tree without this count of K groups
                    print(f"skipped {name} K groups {kg}: {type(e).__name__}: {e}", file=sys.stderr)
                finally:
                    fd.VARIANT = default
    np.savez(outp, **out)


def cmp(a_paths: str, b_paths: str) -> None:
    a = {k: v for p in a_paths.split(",") for k, v in np.load(p).items()}
    b = {k: v for p in b_paths.split(",") for k, v in np.load(p).items()}
    rows = []
    for key in sorted(a):
        base = key.split("/kg")[0]
        other = b.get(key, b.get(base))
        if other is None:
            rows.append({"case": key, "error": "missing in B"})
            continue
        rows.append({"case": key, "values": int(a[key].size),
                     "differing": int((a[key].view(np.uint32) != other.view(np.uint32)).sum()),
                     "equals_own_default": a[key].tobytes() == a[base].tobytes(),
                     "finite": bool(np.isfinite(a[key]).all())})
    missing = sorted(set(b) - set(a))
    for r in rows:
        print(json.dumps(r))
    print(json.dumps({"summary": True, "cases": len(rows), "missing_in_A": missing,
                      "differing_cases": sum(r.get("differing", 1) > 0 for r in rows),
                      "variants_differing_from_default": sum(not r.get("equals_own_default", True) for r in rows)}))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tree":
        tree(*args)
    elif cmd == "make":
        make(*args)
    elif cmd == "run":
        run(args[0], args[1], *map(int, args[2:]))
    elif cmd == "cmp":
        cmp(*args)
    else:
        sys.exit(f"flash_decode_bits: unknown command {cmd!r} (tree, make, run, cmp)")
