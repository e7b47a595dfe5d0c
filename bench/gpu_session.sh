#!/usr/bin/env bash
# One batched GPU run (device machine, single GPU): the tensor-parallel checks, the sweep on GPU vs CPU,
# and the TP decode bench. Results as JSON lines / parquet under $OUT (default ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e failed"
python3 -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
# one file for all checks: the device tool returns at most 8 files
for rot in off on; do
  python3 -m kvlab.tp --device cuda --rotation $rot --flavor ref --ref-device cpu | sed "s/^/ref_vs_cpu_$rot /" >> "$OUT/tp_checks.txt"
  python3 -m kvlab.tp --device cuda --rotation $rot --ref-device cuda | sed "s/^/cuda_$rot /" >> "$OUT/tp_checks.txt"
  python3 -m kvlab.tp --nproc 2 --device cuda --backend gloo --rotation $rot --ref-device cuda | sed "s/^/gloo2_$rot /" >> "$OUT/tp_checks.txt"
done
export KVLAB_CACHE=/tmp/kvc
python3 -m kvlab.cli sweep --device cuda --layers 8 --out "$OUT/sweep-cuda.parquet" --no-progress; echo "sweep cuda rc=$?"
python3 -m kvlab.cli sweep --device cuda --cache-dir /tmp/kvc-warm --out /tmp/sweep-cuda-warm.parquet --no-progress | grep swept
python3 -m kvlab.cli sweep --device cpu --out "$OUT/sweep-cpu.parquet" --no-progress; echo "sweep cpu rc=$?"
python3 - "$OUT/sweep-cpu.parquet" "$OUT/sweep-cuda.parquet" <<'PY'
import sys, pandas as pd, numpy as np
a, b = pd.read_parquet(sys.argv[1]), pd.read_parquet(sys.argv[2])
m = a.merge(b, on=['type_k', 'type_v', 'rotation', 'flavor', 'n_ctx'], suffixes=('', '_gpu'))
print('rows', len(a), len(b), len(m), set(b.device))
for f, g in m.groupby('flavor'):
    for c in ['kl', 'out_rel_l2', 'logit_rel_l2', 'k_rel_l2', 'v_rel_l2', 'topk_overlap']:
        d = np.abs(g[c] - g[c + '_gpu'])
        print(f, c, 'max abs %.3g max rel %.3g' % (d.max(), (d / np.maximum(g[c].abs(), 1e-30)).max()))
PY
python3 -m torch.distributed.run --nproc-per-node 1 bench/tp_decode.py --device cuda --rotation both > "$OUT/tp_decode.jsonl"; echo "tp bench rc=$?"
