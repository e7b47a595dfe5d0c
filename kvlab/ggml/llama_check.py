"""`kvlab check-llama`: kvlab's KLD per K/V pair, and its cache bytes, held against a real llama.cpp.

A small random Llama (GQA, outlier channels in K as real models have) is built in transformers and
written as a float32 GGUF (kvlab.hf.gguf). On the same token ids, chunk by chunk as
`llama-perplexity --kl-divergence` does (second half of each chunk scored, an f16 cache as the base):
- llama.cpp (kvlab.ggml.llama_run): flash attention on, type_k/type_v per pair, rotation at its
  default gate or off (LLAMA_ATTN_ROT_DISABLE=1);
- kvlab: GGMLQuantizedCache(flavor="cpu", k_order="gguf") on the transformers model, read by
  (a) the model's own exact attention ("model") and (b) ggml's CPU flash-attention numerics
  ("ggml-cpu", kvlab.hf.attention).
Per pair: mean KLD, top-1 agreement and delta PPL of each side, the ratio kvlab / llama.cpp, and the
fraction of identical ggml blocks between llama.cpp's cache (its state bytes, kvlab.ggml.state) and
kvlab's, per layer. Layer 0's K/V come from the same floats up to matmul order (ggml's and torch's
sums differ in the last bits), so a value near a rounding step may land on the other side; deeper
layers add the attention's own differences, and an f32 cache keeps every last bit.
Goal (issue 15): the ggml-cpu KLD within 10% of llama.cpp's for every pair, >= 99% identical blocks
at layer 0 for every quantized type.
"""
from dataclasses import asdict, dataclass, field
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from kvlab.types import TYPES, type_info

DEFAULT_PAIRS = (("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_0", "q8_0"), ("f16", "q4_0"), ("q5_1", "iq4_nl"))
ATTENTIONS = ("model", "ggml-cpu")


@dataclass(frozen=True)
class ModelSpec:
    """The small Llama: random weights, a few K channels per head scaled up (outliers)."""
    head_dim: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_layer: int = 4
    vocab: int = 256
    # With these, the f16 base's KLD to q8_0/q8_0 is ~4e-4 and to q4_0/q4_0 ~6e-2 nats (rotation on):
    # the range llama-perplexity shows for real models.
    initializer_range: float = 0.07
    k_outliers: int = 2             # channels per KV head whose k_proj rows are scaled
    outlier_scale: float = 4.0
    seed: int = 0

    @property
    def name(self) -> str:
        return f"hd{self.head_dim}"


@dataclass(frozen=True)
class CheckConfig:
    models: tuple = (ModelSpec(64), ModelSpec(128))
    pairs: tuple = DEFAULT_PAIRS
    rotations: tuple = (True, False)   # llama.cpp's default gate; LLAMA_ATTN_ROT_DISABLE=1
    n_ctx: int = 256
    n_chunks: int = 4
    seed: int = 0
    n_threads: int = 1                 # llama.cpp's; its numbers do not depend on it (prompt batches)
    kld_tolerance: float = 0.10        # |kvlab (ggml-cpu) / llama.cpp - 1| allowed
    min_identical: float = 0.99        # identical blocks at layer 0, quantized types

    def __post_init__(self):
        for k, v in self.pairs:
            type_info(k), type_info(v)
        if self.n_ctx < 8 or self.n_chunks < 1:
            raise ValueError(f"need n_ctx >= 8 and n_chunks >= 1, got {self.n_ctx}, {self.n_chunks}")


def build_model(spec: ModelSpec):
    """The transformers LlamaForCausalLM (float32, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden = spec.n_head * spec.head_dim
    config = LlamaConfig(vocab_size=spec.vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=spec.n_layer, num_attention_heads=spec.n_head,
                         num_key_value_heads=spec.n_head_kv, head_dim=spec.head_dim, max_position_embeddings=4096,
                         initializer_range=spec.initializer_range, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.self_attn.k_proj.weight.view(spec.n_head_kv, spec.head_dim, hidden)  # (n_kv, D, n_embd)
            for h in range(spec.n_head_kv):
                rows = torch.randperm(spec.head_dim, generator=g)[:spec.k_outliers]
                w[h, rows] *= spec.outlier_scale
    return model


@dataclass
class Side:
    """Per-token statistics of one side for one pair, accumulated over chunks."""
    stats: object = None  # kvlab.hf.evaluate.TokenStats

    def add(self, stats) -> None:
        if self.stats is None:
            self.stats = stats
        else:
            self.stats.extend(stats)


@dataclass
class PairResult:
    model: str
    rotation: bool
    type_k: str
    type_v: str
    llama: Side = field(default_factory=Side)
    kvlab: dict = field(default_factory=lambda: {a: Side() for a in ATTENTIONS})
    same_k: list = field(default_factory=list)   # per layer [identical blocks, blocks]
    same_v: list = field(default_factory=list)

    def add_blocks(self, k_counts, v_counts) -> None:
        for acc, counts in ((self.same_k, k_counts), (self.same_v, v_counts)):
            if not acc:
                acc.extend([0, 0] for _ in counts)
            for a, (same, total) in zip(acc, counts):
                a[0] += same
                a[1] += total

    def summary(self, config: CheckConfig) -> dict:
        ll = self.llama.stats.summary()
        row = {"model": self.model, "rotation": self.rotation, "type_k": self.type_k, "type_v": self.type_v,
               "tokens": ll["tokens"], "llama_kld": ll["mean_kld"], "llama_kld_unc": ll["mean_kld_unc"],
               "llama_same_top": ll["same_top"], "llama_delta_ppl": ll["delta_ppl"]}
        for att in ATTENTIONS:
            st = self.kvlab[att].stats
            s = st.summary()
            key = att.replace("-", "_")
            row[f"kvlab_{key}_kld"] = s["mean_kld"]
            row[f"kvlab_{key}_same_top"] = s["same_top"]
            row[f"kvlab_{key}_delta_ppl"] = s["delta_ppl"]
            row[f"ratio_{key}"], row[f"ratio_{key}_unc"] = _ratio(st.kld, self.llama.stats.kld)
        row["identical_k"] = [s / t if t else 1.0 for s, t in self.same_k]
        row["identical_v"] = [s / t if t else 1.0 for s, t in self.same_v]
        row["ok"] = _within(row["ratio_ggml_cpu"], config.kld_tolerance) and all(
            row[f"identical_{w}"][0] >= config.min_identical
            for w, t in (("k", self.type_k), ("v", self.type_v)) if TYPES[t].is_quantized)
        return row


def _ratio(kvlab_kld: np.ndarray, llama_kld: np.ndarray) -> tuple:
    """mean(kvlab) / mean(llama) and its standard error from the paired per-token differences."""
    mean = float(llama_kld.mean())
    if mean == 0.0:
        return (1.0 if float(kvlab_kld.mean()) == 0.0 else math.inf), 0.0
    diff = kvlab_kld - llama_kld
    return float(kvlab_kld.mean()) / mean, float(diff.std(ddof=1) / math.sqrt(diff.size)) / mean


def _within(ratio: float, tolerance: float) -> bool:
    return abs(ratio - 1.0) <= tolerance


def identical_blocks(llama_rows, kvlab_q) -> tuple:
    """(identical blocks, blocks) between llama.cpp's cache rows (n_cells, head_dim * n_head_kv) and a
    GGMLQuantizedLayer's QTensor (1, n_head_kv, n_tokens, head_dim), cell i holding token i."""
    from kvlab.ggml.state import split_heads
    ll = np.asarray(split_heads(llama_rows, kvlab_q.shape[1]).raw)             # (n_kv, n_cells, head bytes)
    kv = np.asarray(kvlab_q.raw.cpu() if hasattr(kvlab_q.raw, "cpu") else kvlab_q.raw)[0]
    if ll.shape != kv.shape:
        raise ValueError(f"llama.cpp's cache {ll.shape} and kvlab's {kv.shape} hold different shapes")
    size = TYPES[kvlab_q.type].type_size
    same = (ll.reshape(-1, size) == kv.reshape(-1, size)).all(axis=1)         # per block
    return int(same.sum()), int(same.size)


def _kvlab_logits(model, chunk, make_cache, first: int):
    """Logits at positions first .. n-2 of one chunk fed in one batch, and the cache it filled."""
    import torch
    cache = make_cache()
    with torch.no_grad():
        logits = model(chunk.view(1, -1), cache=cache, use_cache=True).logits[0]  # (n, vocab)
    return logits[first:-1].float(), cache


def run_model(spec: ModelSpec, config: CheckConfig, gguf_dir: Path, progress=None) -> list:
    """Every pair x rotation of config on one model; returns PairResults."""
    import torch
    from kvlab.ggml.llama_run import LlamaCpp
    from kvlab.ggml.state import read_state
    from kvlab.hf.attention import attention_as
    from kvlab.hf.cache import GGMLQuantizedCache
    from kvlab.hf.evaluate import token_stats
    from kvlab.hf.gguf import write_llama_gguf

    model = build_model(spec)
    path = write_llama_gguf(model, gguf_dir / f"kvlab-check-{spec.name}.gguf")
    rng = np.random.default_rng(config.seed)
    tokens = rng.integers(0, spec.vocab, size=(config.n_chunks, config.n_ctx))
    first = config.n_ctx // 2
    runs = [(k, v, rot) for k, v in config.pairs for rot in config.rotations
            if rot or TYPES[k].is_quantized or TYPES[v].is_quantized]  # off = on without a quantized type
    results = {r: PairResult(spec.name, r[2], r[0], r[1]) for r in runs}
    with LlamaCpp(path, n_threads=config.n_threads) as llama:
        for chunk_ids in tokens:
            chunk = torch.as_tensor(chunk_ids, dtype=torch.long)
            targets = chunk[first + 1:]
            ll_base = torch.from_numpy(llama.run(chunk_ids, "f16", "f16")[0][first:-1])
            kv_base = {}
            for att in ATTENTIONS:
                with attention_as(model, att):
                    kv_base[att] = _kvlab_logits(model, chunk, lambda: GGMLQuantizedCache(
                        model.config, "f16", "f16", "cpu", True, "gguf"), first)[0]
            for k, v, rot in runs:
                res = results[(k, v, rot)]
                ll_logits, state_bytes = llama.run(chunk_ids, k, v, rotation=rot)
                res.llama.add(token_stats(ll_base, torch.from_numpy(ll_logits[first:-1]), targets))
                for att in ATTENTIONS:
                    with attention_as(model, att):
                        logits, cache = _kvlab_logits(model, chunk, lambda: GGMLQuantizedCache(
                            model.config, k, v, "cpu", rot, "gguf"), first)
                    res.kvlab[att].add(token_stats(kv_base[att], logits, targets))
                state = read_state(state_bytes)  # the ggml-cpu run's cache: the closer one beyond layer 0
                if not np.array_equal(state.positions, np.arange(config.n_ctx)):
                    raise RuntimeError("llama.cpp's cache cells do not hold positions 0..n-1 in order")
                res.add_blocks([identical_blocks(lay.k, cl.quantized_keys) for lay, cl in zip(state.layers, cache.layers)],
                               [identical_blocks(lay.v, cl.quantized_values) for lay, cl in zip(state.layers, cache.layers)])
                if progress:
                    progress(spec.name, k, v, rot)
    return list(results.values())


def run_check(config: CheckConfig = CheckConfig(), progress=None) -> dict:
    """Both sides on every model of config; returns the report (rows, ordering, ok, seconds)."""
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvlab-check-llama-") as tmp:
        for spec in config.models:
            rows += [r.summary(config) for r in run_model(spec, config, Path(tmp), progress)]
    return {"config": {**asdict(config), "models": [asdict(m) for m in config.models]},
            "rows": rows, "ordering": ordering(rows), "ok": all(r["ok"] for r in rows),
            "seconds": round(time.perf_counter() - t0, 1)}


def ordering(rows) -> dict:
    """Do the pairs rank the same by KLD on both sides? Per model and rotation: pairs of pairs ranked
    the other way round by kvlab (ggml-cpu), and how many of those are further apart in llama.cpp
    than twice the combined noise (the others are ties within the noise)."""
    out = {}
    groups = {}
    for r in rows:
        groups.setdefault((r["model"], r["rotation"]), []).append(r)
    for (model, rot), group in groups.items():
        swapped, real = 0, 0
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                d_ll = a["llama_kld"] - b["llama_kld"]
                d_kv = a["kvlab_ggml_cpu_kld"] - b["kvlab_ggml_cpu_kld"]
                if d_ll * d_kv < 0:
                    swapped += 1
                    real += abs(d_ll) > 2 * math.hypot(a["llama_kld_unc"], b["llama_kld_unc"])
        out[f"{model} rotation={'on' if rot else 'off'}"] = {"pairs": len(group), "swapped": swapped,
                                                             "swapped_beyond_noise": real}
    return out


def format_report(report: dict) -> str:
    cols = (f"{'model':<6}{'rot':<4}{'K/V':<14}{'llama KLD':>11}{'± %':>6}{'kvlab KLD':>11}{'ratio':>7}"
            f"{'kvlab ggml-cpu':>15}{'ratio':>7}{'± %':>6}{'same top ll/kv':>16}{'ident K0':>9}{'ident V0':>9}"
            f"{'ident K last':>13}  ok")
    lines = [cols, "-" * len(cols)]
    for r in report["rows"]:
        rel = 100 * r["llama_kld_unc"] / r["llama_kld"] if r["llama_kld"] else 0.0
        lines.append(
            f"{r['model']:<6}{'on' if r['rotation'] else 'off':<4}{r['type_k'] + '/' + r['type_v']:<14}"
            f"{r['llama_kld']:>11.3e}{rel:>6.1f}{r['kvlab_model_kld']:>11.3e}{r['ratio_model']:>7.3f}"
            f"{r['kvlab_ggml_cpu_kld']:>15.3e}{r['ratio_ggml_cpu']:>7.3f}{100 * r['ratio_ggml_cpu_unc']:>6.1f}"
            f"{100 * r['llama_same_top']:>8.2f}/{100 * r['kvlab_ggml_cpu_same_top']:<7.2f}"
            f"{100 * r['identical_k'][0]:>9.2f}{100 * r['identical_v'][0]:>9.2f}{100 * r['identical_k'][-1]:>13.2f}"
            f"  {'ok' if r['ok'] else 'MISS'}")
    lines.append("")
    for group, o in report["ordering"].items():
        lines.append(f"ordering {group}: {o['swapped']} of {o['pairs'] * (o['pairs'] - 1) // 2} pair orders "
                     f"swapped, {o['swapped_beyond_noise']} beyond the noise")
    n_miss = sum(not r["ok"] for r in report["rows"])
    lines.append(f"{'OK' if report['ok'] else 'MISSED'}: {len(report['rows']) - n_miss} of {len(report['rows'])} "
                 f"rows within {100 * report['config']['kld_tolerance']:.0f}% (ggml-cpu attention) and >= "
                 f"{100 * report['config']['min_identical']:.0f}% identical blocks at layer 0 ({report['seconds']} s)")
    return "\n".join(lines)
