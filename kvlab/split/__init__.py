"""kvlab.split: a faithful model of ggml's meta backend (--split-mode tensor) in three eras.

    from kvlab.split import BlockConfig, build_attention_block, run_sharded
    b = build_attention_block(BlockConfig(era="flatten", n_devices=2, type_k="q8_0", type_v="q4_0",
                                          n_tokens=8, guard=False))
    tr = b.trace()
    tr.error        # SplitError: the node, op, input states and rule where ggml stops
"""
from kvlab.split.state import Axis, SplitError, SplitState, split_states_equal
from kvlab.split.eras import ERAS, Era, get_era
from kvlab.split import graph
from kvlab.split.graph import Graph, Tensor
from kvlab.split.infer import NodeTrace, Trace, infer, trace
from kvlab.split.attention import Block, BlockConfig, build_attention_block
from kvlab.split.cuda import CudaFA, cuda_flash_attn
from kvlab.split.compat import CompatRow, compat_matrix
from kvlab.split.sharded import ShardedResult, run_sharded

__all__ = [
    "Axis", "SplitError", "SplitState", "split_states_equal", "ERAS", "Era", "get_era", "graph", "Graph",
    "Tensor", "NodeTrace", "Trace", "infer", "trace", "Block", "BlockConfig", "build_attention_block",
    "CudaFA", "cuda_flash_attn", "CompatRow", "compat_matrix", "ShardedResult", "run_sharded",
]
