"""The split model as tables and plain text, for notebooks, the report and the CLI: what stops a config
(explain), one node's state in each era (era_table), the compatibility matrix (compat_frame), and the
sharded run checked against one device (sharded_table). pandas is imported where a table is made.
"""
from kvlab.split.attention import build_attention_block
from kvlab.split.compat import compat_matrix, outcome
from kvlab.split.cuda import cuda_flash_attn
from kvlab.split.eras import ERAS

# (head_dim, n_head, n_head_kv) of some real models, and the three head layouts of the compat matrix
HEAD_CONFIGS = {
    "Llama-3-8B: 128 x 32 q / 8 kv": (128, 32, 8),
    "Qwen2.5-0.5B: 64 x 14 q / 2 kv": (64, 14, 2),
    "Gemma-2-2B: 256 x 8 q / 4 kv": (256, 8, 4),
    "Phi-2: 80 x 32 q / 32 kv": (80, 32, 32),
}
HEAD_LAYOUTS = {"MHA 32 q / 32 kv": (32, 32), "GQA 32 q / 8 kv": (32, 8), "MQA 32 q / 1 kv": (32, 1)}


def trace_block(**config):
    """(block, trace) of llama.cpp's attention block for BlockConfig fields."""
    block = build_attention_block(**config)
    return block, block.trace()


def block_outcome(block, tr) -> str:
    """The kvlab.split.compat OUTCOMES word for one traced block."""
    cfg = block.config
    split = tr.error.rule if tr.error is not None else ""
    return outcome(str(block.init_error or ""), split, cuda_flash_attn(cfg.type_k, cfg.type_v, cfg.head_dim, cfg.era))


def explain(block, tr) -> str:
    """Plain text: what llama.cpp would do with this block and why (init guard, split rule, CUDA FA)."""
    cfg = block.config
    lines = [f"outcome: {block_outcome(block, tr)}"]
    if block.init_error is not None:
        lines.append(f"refused at init: {block.init_error}")
        lines.append(f"  hint: {block.init_error.hint}")
    if tr.error is not None:
        lines.append(f"split state abort{' (behind the guard)' if block.init_error else ''}: {tr.error}")
    elif block.init_error is None:
        lines.append(f"every node has a split state ({len(tr.nodes)} nodes)")
    cuda = cuda_flash_attn(cfg.type_k, cfg.type_v, cfg.head_dim, cfg.era)
    lines.append(f"CUDA flash attention: {cuda.kernel if cuda.runs else 'no kernel'} ({cuda.reason})")
    return "\n".join(lines)


def era_table(node_names, **config):
    """Split state of the named nodes in each era (the guard removed): a DataFrame, nodes x eras.

    A cell is the state, "ABORT: <rule>" at the node where the era's rules fail, or "-" after it.
    """
    import pandas as pd
    columns = {}
    for era in ERAS:
        _, tr = trace_block(era=era, guard=False, **config)
        states = {n.tensor.name: n.state.describe() for n in tr.nodes}
        abort = {tr.error.node: f"ABORT: {tr.error.rule}"} if tr.error is not None else {}
        columns[era] = [states.get(name, abort.get(name, "-")) for name in node_names]
    return pd.DataFrame(columns, index=pd.Index(node_names, name="node"))


def compat_frame(**kwargs):
    """kvlab.split.compat_matrix as a DataFrame (one row per era, K, V, devices, rotation)."""
    import pandas as pd
    return pd.DataFrame([r.to_dict() for r in compat_matrix(**kwargs)])


def layouts_frame(layouts=HEAD_LAYOUTS, devices=(2, 3, 4, 8), head_dim: int = 128, **kwargs):
    """compat_frame for each head layout (MHA / GQA / MQA), with a `layout` column."""
    import pandas as pd
    frames = [compat_frame(devices=devices, head_dim=head_dim, n_head=n_head, n_head_kv=n_head_kv, **kwargs)
              .assign(layout=name) for name, (n_head, n_head_kv) in layouts.items()]
    return pd.concat(frames, ignore_index=True)


def sharded_table(devices=(1, 2, 3, 4), pairs=(("q8_0", "q4_0"),), **config):
    """kvlab.split.run_sharded per device count and pair: do the sharded results equal one device's?"""
    import pandas as pd
    from kvlab.split.sharded import run_sharded
    rows = []
    for n in devices:
        for tk, tv in pairs:
            r = run_sharded(n_devices=n, type_k=tk, type_v=tv, **config)
            rows.append({"devices": n, "pair": f"{tk}/{tv}", "cache bytes equal": all(r.cache_equal.values()),
                         "heads bitwise equal": r.heads_equal, "output within all-reduce bound": r.within_bound})
    return pd.DataFrame(rows).set_index(["devices", "pair"])
