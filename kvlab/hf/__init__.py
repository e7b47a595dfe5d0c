"""kvlab.hf: Hugging Face transformers. A ggml-typed `Cache` (cache), `kvlab eval` (evaluate), and Q/K/V
captured from a real model (capture). Loads torch and transformers.

    from kvlab.hf import GGMLQuantizedCache
"""
from kvlab.hf.cache import CacheTypes, GGMLQuantizedCache, GGMLQuantizedLayer

__all__ = ["CacheTypes", "GGMLQuantizedCache", "GGMLQuantizedLayer"]
