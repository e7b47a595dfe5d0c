"""kvlab.accuracy: what a K/V type pair costs in attention error.

sample (the Q/K/V a sweep reads), synthetic (LLM-like K/V), attention (one cell: exact and ggml-like
backends), metrics, sweep (every pair x rotation x flavor x length), depth (error through a stack).
"""
