"""Which K/V pairs run under --split-mode tensor, per era, device count and rotation setting, and what
stops the others: the init guard, a split-state rule (node + rule), or the CUDA flash-attention build.
"""
from dataclasses import asdict, dataclass
from itertools import product

from kvlab.types import TYPES
from kvlab.split.attention import BlockConfig, build_attention_block
from kvlab.split.cuda import DEFAULT_FA_QUANTS, cuda_flash_attn
from kvlab.split.eras import ERAS

DEVICE_COUNTS = (1, 2, 3, 4, 8)
# The one vocabulary for what happens to a pair, best first (notebooks, report and CLI say these words).
OUTCOMES = ("runs", "runs (slow FA)", "no CUDA FA kernel", "split abort", "refused at init")


@dataclass(frozen=True)
class CompatRow:
    era: str
    type_k: str
    type_v: str
    devices: int
    rotation: bool
    guard: str          # "" or the init refusal
    split: str          # "" or "OP node: rule"
    cuda: str           # "vec", "f16 conversion" or "none: reason"
    outcome: str        # one of OUTCOMES

    def to_dict(self) -> dict:
        return asdict(self)


def outcome(guard: str, split: str, cuda) -> str:
    """The OUTCOMES word for a pair: the first thing that stops it, or how it runs."""
    if guard:
        return "refused at init"
    if split:
        return "split abort"
    if not cuda.runs:
        return "no CUDA FA kernel"
    return "runs" if cuda.kernel == "vec" else "runs (slow FA)"


def compat_matrix(eras=tuple(ERAS), types=tuple(TYPES), devices=DEVICE_COUNTS, rotations=(True, False),
                  head_dim: int = 128, n_head: int = 32, n_head_kv: int = 8, n_tokens: int = 512,
                  fa_quants: str = DEFAULT_FA_QUANTS, all_quants: bool = False) -> list:
    """One CompatRow per (era, K type, V type, device count, rotation). The split check runs with the guard
    removed, so a row refused at init still says what the graph would have done."""
    rows = []
    for era, tk, tv, n, rot in product(eras, types, types, devices, rotations):
        cfg = BlockConfig(head_dim=head_dim, n_head=n_head, n_head_kv=n_head_kv, n_devices=n, type_k=tk,
                          type_v=tv, n_tokens=n_tokens, rotation=rot, era=era, guard=True)
        block = build_attention_block(cfg)
        guard = str(block.init_error) if block.init_error else ""
        tr = block.trace()
        split = f"{tr.error.op} {tr.error.node!r}: {tr.error.rule}" if tr.error else ""
        cuda = cuda_flash_attn(tk, tv, head_dim, era, fa_quants, all_quants)
        cuda_text = cuda.kernel if cuda.runs else f"none: {cuda.reason}"
        rows.append(CompatRow(era, tk, tv, n, rot, guard, split, cuda_text, outcome(guard, split, cuda)))
    return rows
