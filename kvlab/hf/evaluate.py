"""`kvlab eval`: what a K/V cache type pair does to a causal LM's next-token distribution.

Measured as `llama-perplexity --kl-divergence` does (tools/perplexity/perplexity.cpp): the text's
tokens are cut into chunks of n_ctx (the remainder is dropped), each chunk starts from an empty
cache (its first token replaced by BOS when the tokenizer adds one), is fed in batches of n_batch,
and the tokens after the first n_ctx/2 are scored. Per scored token: KL(base || pair) of the
next-token distributions, the NLL of the actual next token under both, whether the top-1 tokens
agree, and the change of that token's probability. Summaries and their ± are llama.cpp's
(mean_and_uncertainty, with the covariance of the two NLLs for the PPL difference).
Differences from llama.cpp: the base log-probs are kept in float64 (llama.cpp stores them as
16-bit codes and skips base log-probs below -16 in the KL sum), and the base is computed in
the same run instead of read from a --kl-divergence-base file.

    kvlab eval --model /models/Qwen2.5-0.5B --text wiki.test.raw --pairs q8_0/q8_0,q4_0/q4_0,q4_0/q8_0
    kvlab eval --tiny --text README.md --pairs all --ctx 128 --chunks 2   # random tiny model, bytes as tokens

From code: `evaluate(model, tokens, pairs, EvalConfig(...))` -> EvalResult; `format_table(result)`.
"""
from dataclasses import dataclass, field
import math

import numpy as np

from kvlab.types import TYPES, type_info

BASE_DYNAMIC = "dynamic"  # base = transformers' own DynamicCache, K/V kept in the model's dtype


@dataclass(frozen=True)
class EvalConfig:
    n_ctx: int = 512                 # tokens per chunk (llama-perplexity -c)
    n_batch: int | None = None       # tokens per forward pass (-b); None = n_ctx, one pass per chunk
    n_chunks: int | None = None      # None = every whole chunk of the text
    flavor: str = "ref"              # which ggml code path writes the quantized bytes
    rotation: bool | None = None     # None = llama.cpp's default gate
    base: str = "f16"                # K and V type of the reference cache, or "dynamic"
    k_order: str = "model"           # "gguf": K heads in llama.cpp's channel order (GGMLQuantizedCache)
    attention: str = "model"         # "ggml-cpu"/"ggml-cuda": read the cache as ggml's FA (kvlab.hf.attention)

    def __post_init__(self):
        if self.n_ctx < 4:
            raise ValueError(f"n_ctx must be at least 4, got {self.n_ctx}")
        if self.n_batch is not None and self.n_batch < 1:
            raise ValueError(f"n_batch must be positive, got {self.n_batch}")
        if self.n_chunks is not None and self.n_chunks < 1:
            raise ValueError(f"n_chunks must be positive, got {self.n_chunks}")
        if self.base != BASE_DYNAMIC:
            type_info(self.base)
        if self.k_order not in ("model", "gguf"):
            raise ValueError(f"k_order must be model or gguf, got {self.k_order!r}")
        if self.attention not in ("model", "ggml-cpu", "ggml-cuda"):
            raise ValueError(f"attention must be model, ggml-cpu or ggml-cuda, got {self.attention!r}")
        if self.attention != "model" and self.base == BASE_DYNAMIC:
            raise ValueError(f"attention {self.attention} reads a ggml cache: the base cannot be {BASE_DYNAMIC!r}")

    @property
    def first(self) -> int:
        return self.n_ctx // 2       # tokens before this are context only, as in llama-perplexity


def parse_pairs(specs) -> list[tuple[str, str]]:
    """["q4_0/q8_0", "q8_0", "all"] -> [("q4_0", "q8_0"), ("q8_0", "q8_0"), ...81 pairs]. "T" means T/T."""
    pairs = []
    for spec in specs:
        if spec == "all":
            pairs += [(k, v) for k in TYPES for v in TYPES]
            continue
        parts = spec.split("/")
        if len(parts) > 2 or not all(parts):
            raise ValueError(f"a K/V pair is written K/V (e.g. q4_0/q8_0), T for T/T, or all; got {spec!r}")
        for name in parts:
            type_info(name)
        pairs.append((parts[0], parts[-1]))
    if not pairs:
        raise ValueError("no K/V pair given")
    return list(dict.fromkeys(pairs))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama-perplexity's mean and its standard error (0 for 10 values or fewer)."""
    n = values.size
    mean = float(values.mean())
    var = float((values * values).mean()) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


@dataclass
class TokenStats:
    """Per scored token, for one K/V pair against the base."""
    kld: np.ndarray       # KL(base || pair), nats
    nll: np.ndarray       # -log p_pair(next token)
    nll_base: np.ndarray  # -log p_base(next token)
    same_top: np.ndarray  # bool: argmax of the two distributions agree

    def extend(self, other: "TokenStats") -> None:
        for name in ("kld", "nll", "nll_base", "same_top"):
            setattr(self, name, np.concatenate([getattr(self, name), getattr(other, name)]))

    def summary(self) -> dict:
        n = self.kld.size
        kld, kld_unc = mean_and_uncertainty(self.kld)
        log_ppl, log_ppl_unc = mean_and_uncertainty(self.nll)
        log_base, log_base_unc = mean_and_uncertainty(self.nll_base)
        cov = 0.0
        if n >= 10:
            cov = (float((self.nll * self.nll_base).mean()) - log_ppl * log_base) / (n - 1)
        ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
        ppl_unc, ppl_base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
        p_diff = np.exp(-self.nll) - np.exp(-self.nll_base)
        same = float(self.same_top.mean())
        return {
            "tokens": n,
            "mean_kld": kld, "mean_kld_unc": kld_unc,
            "median_kld": float(np.median(self.kld)),
            "p99_kld": float(np.quantile(self.kld, 0.99)),
            "max_kld": float(self.kld.max()),
            "same_top": same, "same_top_unc": math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            "ppl": ppl, "ppl_base": ppl_base,
            "delta_ppl": ppl - ppl_base,
            "delta_ppl_unc": math.sqrt(max(ppl_unc ** 2 + ppl_base_unc ** 2 - 2 * ppl * ppl_base * cov, 0.0)),
            "ln_ppl_ratio": log_ppl - log_base,
            "rms_dp": float(np.sqrt((p_diff * p_diff).mean())),
        }


def token_stats(logits_base, logits, targets) -> TokenStats:
    """Compare two (n, vocab) logit tensors at the same positions; targets (n,) are the next tokens."""
    import torch
    logp_base = torch.log_softmax(logits_base.double(), dim=-1)   # (n, vocab)
    logp = torch.log_softmax(logits.double(), dim=-1)             # (n, vocab)
    kld = (logp_base.exp() * (logp_base - logp)).sum(-1)
    at = targets.view(-1, 1)                                      # (n, 1)
    return TokenStats(kld=kld.numpy(), nll=-logp.gather(1, at)[:, 0].numpy(),
                      nll_base=-logp_base.gather(1, at)[:, 0].numpy(),
                      same_top=(logp.argmax(-1) == logp_base.argmax(-1)).numpy())


@dataclass
class EvalResult:
    config: EvalConfig
    n_chunks: int
    pairs: dict = field(default_factory=dict)   # (type_k, type_v) -> TokenStats

    def summaries(self) -> list[dict]:
        return [{"type_k": k, "type_v": v, **stats.summary()} for (k, v), stats in self.pairs.items()]


def chunk_logits(model, chunk, make_cache, config: EvalConfig):
    """Logits at positions first .. n_ctx-2 of one chunk (1, n_ctx), fed in batches through a fresh cache."""
    import torch
    cache = make_cache()
    n_batch = config.n_batch or config.n_ctx
    kept = []
    with torch.no_grad():
        for start in range(0, config.n_ctx, n_batch):
            ids = chunk[:, start:start + n_batch]
            logits = model(ids, cache=cache, use_cache=True).logits[0]    # (batch, vocab)
            lo = max(config.first - start, 0)
            hi = min(config.n_ctx - 1 - start, ids.shape[1])
            if lo < hi:
                kept.append(logits[lo:hi].float().cpu())
    return torch.cat(kept)                                               # (n_ctx - 1 - first, vocab)


def cache_factory(model, type_k: str, type_v: str, config: EvalConfig):
    from transformers import DynamicCache
    from kvlab.hf.cache import GGMLQuantizedCache
    if type_k == type_v == BASE_DYNAMIC:
        return lambda: DynamicCache(config=model.config)
    return lambda: GGMLQuantizedCache(model.config, type_k, type_v, config.flavor, config.rotation, config.k_order)


def evaluate(model, tokens, pairs, config: EvalConfig = EvalConfig(), bos_id: int | None = None,
             progress: bool = True) -> EvalResult:
    """KL divergence, top-1 agreement and PPL change of each (type_k, type_v) pair against config.base.

    model: a transformers causal LM (eval mode, on its device); tokens: 1-D sequence of token ids;
    bos_id: written over each chunk's first token (as llama-perplexity does when the vocab adds BOS).
    """
    import torch
    from tqdm.auto import tqdm
    from kvlab.hf.attention import attention_as
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    available = tokens.numel() // config.n_ctx
    n_chunks = min(available, config.n_chunks or available)
    if n_chunks == 0:
        raise ValueError(f"the text has {tokens.numel()} tokens, fewer than one chunk of n_ctx={config.n_ctx}")
    pairs = [tuple(p) for p in pairs]
    base = cache_factory(model, config.base, config.base, config)
    result = EvalResult(config, n_chunks)
    bar = tqdm(total=n_chunks * (1 + len(pairs)), unit="pass", desc="kvlab eval", disable=not progress)
    try:
        with attention_as(model, config.attention):
            _evaluate_chunks(model, tokens, pairs, config, bos_id, base, result, bar)
    finally:
        bar.close()
    return result


def _evaluate_chunks(model, tokens, pairs, config, bos_id, base, result, bar) -> None:
    device = next(model.parameters()).device
    for i in range(result.n_chunks):
        chunk = tokens[i * config.n_ctx:(i + 1) * config.n_ctx].clone()   # (n_ctx,)
        targets = chunk[config.first + 1:]                                   # next token of each scored position
        if bos_id is not None:
            chunk[0] = bos_id
        chunk = chunk.view(1, -1).to(device)                                # (1, n_ctx)
        logits_base = chunk_logits(model, chunk, base, config)
        bar.update()
        for k, v in pairs:
            stats = token_stats(logits_base, chunk_logits(model, chunk, cache_factory(model, k, v, config), config),
                                targets)
            if (k, v) in result.pairs:
                result.pairs[(k, v)].extend(stats)
            else:
                result.pairs[(k, v)] = stats
            bar.set_postfix_str(f"{k}/{v}")
            bar.update()


def format_table(result: EvalResult) -> str:
    """The summary table, one row per pair, in llama-perplexity's terms."""
    rows = result.summaries()
    c = result.config
    head = (f"base: {c.base}/{c.base} cache, {result.n_chunks} chunk(s) of n_ctx={c.n_ctx}, "
            f"{rows[0]['tokens']} scored tokens, PPL(base) = {rows[0]['ppl_base']:.4f}, flavor={c.flavor}, "
            f"rotation={'llama.cpp default' if c.rotation is None else c.rotation}, attention={c.attention}, "
            f"k_order={c.k_order}")
    cols = f"{'K/V':<14}{'Mean KLD':>22}{'99% KLD':>11}{'Same top %':>18}{'PPL(Q)':>11}{'dPPL':>22}{'RMS dp %':>10}"
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        lines.append(f"{r['type_k'] + '/' + r['type_v']:<14}"
                     f"{r['mean_kld']:>11.6f} ± {r['mean_kld_unc']:<8.6f}{r['p99_kld']:>11.6f}"
                     f"{100 * r['same_top']:>9.3f} ± {100 * r['same_top_unc']:<6.3f}{r['ppl']:>11.4f}"
                     f"{r['delta_ppl']:>11.5f} ± {r['delta_ppl_unc']:<8.5f}{100 * r['rms_dp']:>10.4f}")
    return "\n".join(lines)


# ---- models: a local directory, or a tiny random one (bytes as tokens) for tests and CI -------------------

TINY_VOCAB = 256  # one token per UTF-8 byte


def tiny_llama(seed: int = 0, initializer_range: float = 0.2):
    """A randomly initialised 2-layer Llama (hidden 128, 4 heads, 2 KV heads, head_dim 64), no download.

    The large initializer_range makes attention peaked enough that cache quantization is visible.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         initializer_range=initializer_range, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def load_local_model(path: str, dtype: str, device: str):
    """(model, tokenize(text) -> token ids, BOS id or None) for a model directory on disk, read offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    specials = tokenizer("", add_special_tokens=True).input_ids
    bos_id = tokenizer.bos_token_id if specials and specials[0] == tokenizer.bos_token_id else None
    return model.to(device).eval(), lambda text: tokenizer(text, add_special_tokens=False).input_ids, bos_id


# ---- command line --------------------------------------------------------------------------------------------


