"""kvlab.split: a faithful model of ggml's meta backend (--split-mode tensor) in three eras.

    from kvlab.split import BlockConfig, build_attention_block, trace_block
    tr = trace_block(BlockConfig(era="flatten", n_devices=2, type_k="q8_0", type_v="q4_0", n_tokens=8, guard=False))
    tr.error        # SplitError: which node, op, input states and rule stopped ggml
"""
from .state import Axis, SplitError, SplitState, split_states_equal
from .eras import ERAS, Era, get_era
from . import graph
from .graph import Graph, Tensor
from .infer import NodeTrace, Trace, infer, trace
from .attention import Block, BlockConfig, build_attention_block
