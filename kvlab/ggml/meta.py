"""The real meta backend (ggml-backend-meta.cpp) inferring split states for llama.cpp's attention block.

kvlab.split models `ggml_backend_meta_get_split_state`; this module asks the real library the same
question, through ctypes, with no compiler: it builds the block with ggml's graph API the way
llama.cpp does (llm_graph_context::build_attn, llama_mul_mat_hadamard, llama_kv_cache::cpy_k/get_k,
build_attn_mha), puts weights and caches in a meta buffer over N copies of the CPU device whose
get_split_state callback answers what llama.cpp's `llama_meta_device_get_split_state` would, and lets
`ggml_gallocr_alloc_graph` initialise every node on the meta buffer type. That is where ggml infers
each state; with GGML_META_DEBUG=1 it logs one line per tensor through the ggml_log_set callback:

    SPLIT_STATE: {srcs} -> name[OP, axis, {ne_dev0xnr, ne_dev1xnr, ...}]     (0.3.36: "4x7")
    SPLIT_STATE: {srcs} -> name[OP, axis, {ne_dev0, ne_dev1, ...}]           (0.3.24, no nr: "4")

Inference only: nothing is computed (executing set_rows through a bare gallocr on the meta backend
crashes; llama.cpp drives it through ggml_backend_sched).

A failed GGML_ASSERT/GGML_ABORT kills the process, so every configuration runs in a child process
(`infer_split_states`): `python kvlab/ggml/meta_child.py LIB_DIR SPEC_JSON`, standard library only.
The child prints the graph it built, the struct layout it found and every SPLIT_STATE line as it comes
(unbuffered), so an abort loses nothing; the abort message comes from stderr (GGML_NO_BACKTRACE=1).

Two layouts of `struct ggml_backend_meta_split_state` exist: with `uint32_t nr[16]` (PR #23792,
llama-cpp-python 0.3.36, ggml-python 0.0.45) and without (0.3.24). The callback must write the
library's layout, so the child probes first: a one-node graph in a compute buffer (MIRRORED, no
callback involved) and the format of its debug line ("0x1" has nr, "0" has not) tells which.
The callback returns a 2 KB struct by value, which ctypes callbacks cannot do; on x86-64 (System V
and Windows) such a return is a hidden first pointer argument that the callee fills and returns,
so the callback is declared that way. Other architectures get a clear error.

Known version drift (ggml-python 0.0.45 against October-2026 ggml): its handle_reshape lacks two cases
of the 0.3.36 code (multi-segment sources, and moving a complete dim-0 split of [ne0, 1] to axis 1),
and it asserts `n_segments == 1` before looking at the source. kvlab.ggml.check lists what that changes.
"""
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvlab.ggml.lib import find_lib_dir

_LINE = re.compile(r"SPLIT_STATE: \{.*\} -> (?P<name>.*)\[(?P<op>[A-Z0-9_]+), (?P<axis>\w+), \{(?P<ne>[^}]*)\}\]\s*$")
_ABORT = re.compile(r"^\S+\.(?:c|cpp|h):\d+: .*$", re.M)


@dataclass
class BlockSpec:
    """What the child builds: one attention layer (layer 0), ggml `ne` order throughout."""
    head_dim: int
    n_head: int
    n_head_kv: int
    n_tokens: int
    cells: int                    # KV cells FA reads (n_kv)
    width: int                    # n_embd
    type_k: int                   # ggml_type of cache_k_l0
    type_v: int
    rot_k: int = 0                # size of attn_inp_k_rot (0: K not rotated)
    rot_v: int = 0
    rotation_4d: bool = False     # PR #23225's reshape_4d(n, ne0/n, ne1, ne2*ne3) instead of the 2D flatten
    n_devices: int = 2
    static_states: dict = field(default_factory=dict)   # name -> [axis, [[ne per device] per segment], [nr]]


@dataclass
class MetaResult:
    """What the real meta backend said about one configuration."""
    layout: str                   # "nr" or "no-nr" (the struct the library has), "" if never probed
    graph: list                   # [name, op, ne] in graph order (leafs, then nodes)
    states: dict                  # name -> (axis label, per-device ne of segment 0, nr of segment 0)
    abort: str = ""               # the GGML_ASSERT/GGML_ABORT message, if the library stopped
    error: str = ""               # the child failed some other way (traceback, timeout)

    @property
    def ok(self) -> bool:
        return not self.abort and not self.error


# --------------------------------------------------------------------------------------------- parent

def parse_state_line(line: str):
    """(name, op, (axis, per-device ne, nr)) of one SPLIT_STATE line, or None for any other line."""
    m = _LINE.search(line)
    if not m:
        return None
    counts = [c.strip() for c in m["ne"].split(",") if c.strip()]
    ne = tuple(int(c.split("x")[0]) for c in counts)
    nr = int(counts[0].split("x")[1]) if counts and "x" in counts[0] else 1
    return m["name"], m["op"], (m["axis"], ne, nr)


def parse_child_output(stdout: str, stderr: str, returncode: int) -> MetaResult:
    res = MetaResult(layout="", graph=[], states={})
    for line in stdout.splitlines():
        if line.startswith("KVLAB_LAYOUT "):
            res.layout = line.split()[1]
        elif line.startswith("KVLAB_GRAPH "):
            res.graph = json.loads(line[len("KVLAB_GRAPH "):])
        else:
            parsed = parse_state_line(line)
            if parsed:
                res.states.setdefault(parsed[0], parsed[2])   # first inference wins (a cache reset re-logs it)
    if returncode != 0:
        aborts = _ABORT.findall(stderr)
        if aborts:
            res.abort = aborts[-1].split(": ", 1)[1]
        else:
            res.error = (stderr.strip().splitlines() or [f"exit status {returncode}"])[-1]
    return res


def infer_split_states(spec: BlockSpec, lib_dir, timeout: float = 60.0) -> MetaResult:
    """Run one configuration through the real meta backend in a child process."""
    env = {**os.environ, "GGML_META_DEBUG": "1", "GGML_NO_BACKTRACE": "1"}
    child = Path(__file__).resolve().with_name("meta_child.py")
    args = [sys.executable, str(child), str(find_lib_dir(lib_dir)), json.dumps(asdict(spec))]
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return MetaResult("", [], {}, error=f"timed out after {timeout:.0f} s")
    return parse_child_output(p.stdout, p.stderr, p.returncode)
