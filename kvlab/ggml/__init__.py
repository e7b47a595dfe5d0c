"""kvlab.ggml: the real ggml C library, through ctypes. lib (load it; type traits: the ground-truth bytes),
meta (the real meta backend's split states, one child process per graph), check (`kvlab check-ggml`)."""
