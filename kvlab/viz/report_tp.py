"""The report's tensor-parallel section: why `--split-mode tensor` broke with a quantized KV cache, what
PR #23225 and PR #23792 changed, and which K/V pairs, head layouts and device counts run in each era.

Every sentence with a number or a state is computed here from kvlab.split (the three eras' rules, the
init guard, ggml-cuda's flash-attention build), so the text cannot drift from the model.
"""
import html

from kvlab.accuracy.table import select
from kvlab.split.compat import OUTCOMES
from kvlab.split.tables import HEAD_LAYOUTS, era_table, layouts_frame, trace_block

# The config of the seed's report: Llama-3-8B's attention, K q8_0 / V q4_0, a prompt batch, 2 GPUs
SEED = dict(head_dim=128, n_head=32, n_head_kv=8, n_devices=2, type_k="q8_0", type_v="q4_0", n_tokens=8)
K_PATH = ["Kcur-0 (rope)", "Kcur-0 (rot in)", "Kcur-0 (rot)", "Kcur-0 (rot out)", "Kcur-0 (rot out) (view)",
          "cache_k_l0 (set_rows)", "__fattn__-0", "attn_out-0"]
DEVICES = (2, 3, 4, 8)


def _pre(text: str) -> str:
    return f"<pre class='kvlab-error'>{html.escape(text)}</pre>"


def _count(frame, **where) -> int:
    return len(select(frame, **where))


def _mqa_finding(frame) -> str:
    """MQA under PR #23792: rotation on against off, and the rule that stops it (computed)."""
    mqa = next(name for name, (_, kv) in HEAD_LAYOUTS.items() if kv == 1)
    sel = frame[(frame.era == "pr23792") & (frame.layout == mqa) & (frame.devices == DEVICES[0])]
    on, off = sel[sel.rotation], sel[~sel.rotation]
    aborts_on, aborts_off = _count(on, outcome="split abort"), _count(off, outcome="split abort")
    quantized_k = on[on.type_k.isin(["q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"])]
    rules = quantized_k[quantized_k.outcome == "split abort"].split.str.split(": ", n=1).str[1].value_counts()
    block, tr = trace_block(era="pr23792", guard=False, **{**SEED, "n_head_kv": 1})
    inputs = "; ".join(f"{name}: {state}" for name, state in tr.error.inputs) if tr.error is not None else ""
    text = (f"<p><b>MQA with the rotation still aborts after PR #23792.</b> With one KV head ({mqa}, "
            f"{DEVICES[0]} devices) the head cannot be cut, so one device holds all of K: the rotation's MUL_MAT "
            f"receives <code>{html.escape(inputs)}</code>, a mirrored matrix times activations split on axis 0, for "
            f"which the 0.3.36 rules have no case. With the rotation on, {aborts_on} of {len(on)} pairs stop at a "
            f"split rule; with it off (<code>LLAMA_ATTN_ROT_DISABLE=1</code>), {aborts_off}.")
    if len(rules):
        text += (f" {rules.iloc[0]} of the {len(quantized_k)} quantized-K pairs stop at "
                 f"<code>{html.escape(rules.index[0])}</code>.")
    stopped_off = off[off.outcome == "split abort"]
    if len(stopped_off):
        rule_off = stopped_off.split.str.split(": ", n=1).str[1].value_counts()
        with_f32 = bool(((stopped_off.type_k == "f32") | (stopped_off.type_v == "f32")).all())
        text += (f" Without the rotation, the {len(stopped_off)} that still stop hit "
                 f"<code>{html.escape(rule_off.index[0])}</code>"
                 + (" and all have an f32 side (f32 K/V is cast to f16 before flash attention)." if with_f32 else "."))
    text += " The seed's pair on an MQA model:</p>"
    return text + _pre(str(tr.error) if tr.error is not None else "no split error")


def stops_table(frame) -> str:
    """Per era (rows) and head layout (columns), rotation on, first device count: the node and rule that stop
    the most pairs, with how many (HTML)."""
    import pandas as pd
    sel = frame[frame.rotation & (frame.devices == DEVICES[0]) & (frame.split != "")]
    cells = {}
    for (era, layout), part in sel.groupby(["era", "layout"], sort=False):
        rule, n = part.split.value_counts().index[0], int(part.split.value_counts().iloc[0])
        cells.setdefault(layout, {})[era] = f"{n} pairs: {rule}"
    table = pd.DataFrame(cells).reindex(index=list(dict.fromkeys(frame.era)), columns=list(HEAD_LAYOUTS)).fillna("-")
    with pd.option_context("display.max_colwidth", None):
        return table.to_html(classes="kvlab-table", border=0)


def tp_section(plots) -> list:
    """The section as a list of HTML strings and (title, figure) pairs, in reading order."""
    import pandas as pd
    guarded, _ = trace_block(era="flatten", guard=True, **SEED)
    _, tr = trace_block(era="flatten", guard=False, **SEED)
    states = era_table(K_PATH, **SEED)
    frame = layouts_frame(devices=DEVICES, rotations=(True, False))
    gqa = frame[(frame.layout == list(HEAD_LAYOUTS)[1]) & (frame.devices == DEVICES[0]) & frame.rotation]
    runs = {era: _count(gqa, era=era, outcome="runs") + _count(gqa, era=era, outcome="runs (slow FA)")
            for era in dict.fromkeys(gqa.era)}
    cfg = (f"Llama-3-8B's attention (head_dim {SEED['head_dim']}, {SEED['n_head']} q / {SEED['n_head_kv']} kv heads), "
           f"K {SEED['type_k']} / V {SEED['type_v']}, a batch of {SEED['n_tokens']} tokens on {SEED['n_devices']} devices")
    rot_in = states.loc["Kcur-0 (rot in)"]
    with pd.option_context("display.max_colwidth", None):
        state_table = states.to_html(classes="kvlab-table", border=0)
    return [
        f"<p>Under <code>--split-mode tensor</code> ggml's meta backend gives every tensor a <i>split state</i> "
        f"(split on an axis, MIRRORED, or PARTIAL sums) and infers each node's state from its sources; where no "
        f"rule fits it aborts. kvlab models the rules of three eras: <b>flatten</b> (llama.cpp of June 2026), "
        f"<b>pr23225</b> (that code plus PR #23225) and <b>pr23792</b> (October 2026, PR #23792 merged). "
        f"Config below: {cfg}.</p>"
        "<h3>Why it broke</h3><p>As shipped, the context was refused before any graph was built:</p>"
        + _pre(str(guarded.init_error)) +
        f"<p>Behind that guard, the Hadamard rotation (<code>llama_mul_mat_hadamard</code>) reshapes K "
        f"<code>[head_dim, n_head_kv, T]</code>, split by heads, to 2D <code>[head_dim, n_head_kv·T]</code>: each "
        f"device's heads come back once per token, an interleaving the pre-#23792 split state cannot describe. It "
        f"records <code>{html.escape(rot_in['flatten'])}</code> (one contiguous slice per device), the reshape back "
        f"turns that into a split by tokens, and the graph stops where K is written into its head-split cache:</p>"
        + _pre(str(tr.error)) +
        "<h3>What PR #23225 and PR #23792 changed</h3>"
        f"<p><b>PR #23225</b> keeps the rotation 4D (<code>[n, head_dim/n, heads, T]</code>): the heads keep an axis "
        f"of their own (<code>{html.escape(rot_in['pr23225'])}</code>) and one added mul_mat rule lets a mirrored "
        f"matrix multiply a tensor split on axis 2 or 3. <b>PR #23792</b> keeps the 2D flatten but gives split states "
        f"a repeat count <code>nr</code>: <code>{html.escape(rot_in['pr23792'])}</code> says the per-device slices "
        f"repeat once per token, and the reshape back recovers the head split. K's path in each era (guard removed; "
        f"\"-\": not reached):</p>" + state_table +
        "<p>Below, each tensor of the graph is drawn as its four <code>ne</code> boxes, the split dimension cut by "
        "device (counts written in), the three eras one above the other. Drag the slider to walk the graph; it "
        "opens at the first node where the eras disagree.</p>",
        ("The split of each tensor, era by era (slider: node by node)", plots.split_flow_figure(**SEED)),
        "<h3>Which pairs run now</h3>"
        "<p>Whether a pair then runs on GPUs is a second question: ggml-cuda compiles flash-attention vector kernels "
        "only for some K/V pairs (<code>GGML_CUDA_FA_QUANTS</code>). Each pair gets one of: "
        + ", ".join(f"<i>{o}</i>" for o in OUTCOMES) + f". On the GQA model with {DEVICES[0]} devices, pairs that "
        "run (at any speed): " + ", ".join(f"{era} {n} of {_count(gqa, era=era)}" for era, n in runs.items()) + ".</p>",
        ("Outcome counts per era, head layout and device count (rotation on)",
         plots.compat_counts_figure(frame[frame.rotation])),
        (f"Every K/V pair on the GQA model, {DEVICES[0]} devices, rotation on (hover a cell for the rule or kernel)",
         plots.compat_figure(gqa)),
        f"<p>Where the split rules stop a graph (guard removed), per era and head layout, {DEVICES[0]} devices, "
        "rotation on: the node and the C rule that stop the most pairs (\"-\": none stops).</p>" + stops_table(frame),
        _mqa_finding(frame),
    ]
