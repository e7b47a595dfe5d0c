"""kvlab.tp: tensor parallelism for real. model (llama.cpp's attention block sharded over torch.distributed
ranks), decode_model (bytes and time of a decode step per device). `python -m kvlab.tp` = `kvlab tp`."""

PAIRS = ("f16/f16", "q8_0/q8_0", "q4_0/q4_0", "q8_0/q4_0", "q4_0/q8_0")
ROTATIONS = {"both": (True, False), "on": (True,), "off": (False,)}   # the --rotation choices
