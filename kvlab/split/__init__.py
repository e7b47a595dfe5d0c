"""kvlab.split: a faithful model of ggml's meta backend (--split-mode tensor) in three eras.

    from kvlab.split import BlockConfig, build_attention_block, trace, run_sharded
    b = build_attention_block(BlockConfig(era="flatten", n_devices=2, type_k="q8_0", type_v="q4_0",
                                          n_tokens=8, guard=False))
    tr = trace(b.graph, b.era, 2, b.static_states)
    tr.error        # SplitError: the node, op, input states and rule where ggml stops
"""
from .state import Axis, SplitError, SplitState, split_states_equal
from .eras import ERAS, Era, get_era
from . import graph
from .graph import Graph, Tensor
from .infer import NodeTrace, Trace, infer, trace
from .attention import Block, BlockConfig, build_attention_block
from .cuda import CudaFA, cuda_flash_attn
from .compat import CompatRow, compat_matrix
from .sharded import ShardedResult, run_sharded

__all__ = [
    "Axis", "SplitError", "SplitState", "split_states_equal", "ERAS", "Era", "get_era", "graph", "Graph",
    "Tensor", "NodeTrace", "Trace", "infer", "trace", "Block", "BlockConfig", "build_attention_block",
    "CudaFA", "cuda_flash_attn", "CompatRow", "compat_matrix", "ShardedResult", "run_sharded",
]
