"""A small random Llama in transformers and the same weights in a real llama.cpp (llama-cpp-python), built
once per session: what kvlab's state reader and check-llama tests run on. Nothing is downloaded."""
import pytest


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    """(spec, transformers model, kvlab.ggml.llama_run.LlamaCpp) for a 2-layer head_dim-64 GQA Llama."""
    from kvlab.ggml.llama_check import ModelSpec, build_model
    from kvlab.ggml.llama_run import LlamaCpp
    from kvlab.hf.gguf import write_llama_gguf
    spec = ModelSpec(head_dim=64, n_layer=2)
    model = build_model(spec)
    path = write_llama_gguf(model, tmp_path_factory.mktemp("llama") / "small.gguf")
    with LlamaCpp(path, n_threads=1) as llama:
        yield spec, model, llama
