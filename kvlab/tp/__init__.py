"""kvlab.tp: tensor parallelism for real. model (llama.cpp's attention block sharded over torch.distributed
ranks), dist (the process group), check (the sharded run against one process: `kvlab tp` = `python -m
kvlab.tp`), decode_model (bytes and time of a decode step per device)."""

PAIRS = ("f16/f16", "q8_0/q8_0", "q4_0/q4_0", "q8_0/q4_0", "q4_0/q8_0")
ROTATIONS = {"both": (True, False), "on": (True,), "off": (False,)}   # the --rotation choices
