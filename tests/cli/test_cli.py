"""The command line's conventions: llama.cpp's spellings, comma lists, documented defaults and exit statuses,
and every user error as one line `kvlab <command>: error: ...` with exit 2 before any work starts."""
import json
import subprocess
import sys

import numpy as np
import pytest

import kvlab
from kvlab.cli import build_parser, main
from kvlab.cli.options import HelpFormatter


# {tmp}: a folder holding text.txt, file.txt (a file, so nothing can live under it) and empty/ (a directory)
BAD = [
    "sweep --types Q9_9",
    "sweep --types q4_0,,q8_0",
    "sweep -ctk q4_0 -ctv q3_k",
    "sweep --lengths 128,abc",
    "sweep --lengths 0",
    "sweep --lengths 2 --n-q 4",
    "sweep --flavors avx",
    "sweep --out {tmp}/t.xlsx",
    "sweep --out {tmp}/empty",
    "sweep --data {tmp}/missing.npz",
    "sweep --data {tmp}/text.txt",
    "sweep --data minilm --lengths 128,1024",    # 512 captured tokens
    "sweep --device tpu",
    "sweep --layers -1",
    "report --out {tmp}/empty",
    "report --out {tmp}/file.txt/r.html",
    "report --table {tmp}/t.xlsx",
    "report --layer-tokens 0",
    "report --bogus-option",
    "eval --tiny --text {tmp}/missing.txt",
    "eval --model {tmp}/empty --text {tmp}/text.txt",
    "eval --model {tmp}/missing --text {tmp}/text.txt",
    "eval --tiny --text {tmp}/text.txt --pairs q4_0/q8_0/f16",
    "eval --tiny --text {tmp}/text.txt --pairs q4_0/q3_k",
    "eval --tiny --text {tmp}/text.txt --ctx 2",
    "eval --tiny --text {tmp}/text.txt --json {tmp}/empty",
    "eval --tiny",
    "eval --text {tmp}/text.txt",
    "trace --fa-quants bogus",
    "trace -ctk q9",
    "trace --devices 0",
    "trace --devices 32",
    "trace --n-head 30 --n-head-kv 8",
    "trace --era bogus",
    "trace -ub -3",
    "compat --devices 1;2",
    "compat --devices 2,x",
    "compat --era flatten,nope",
    "check-ggml --lib {tmp}/empty",
    "tp --pairs q4_0/zz",
    "tp --cells 100",
    "tp --n-past 300",
    "tp --nproc 0",
    "tp --n-head 6 --n-head-kv 4",
    "nosuchcommand",
    "",
]
COMMANDS = {"report", "sweep", "trace", "compat", "eval", "check-ggml", "tp"}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "text.txt").write_text("some text " * 20)
    (tmp / "file.txt").write_text("x")
    (tmp / "empty").mkdir()
    return tmp


def _one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kvlab{' ' + command if command else ''}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("invocation", BAD)
def test_a_user_error_is_one_line_with_exit_2_before_any_work(invocation, tmp, capsys):
    argv = invocation.format(tmp=tmp).split()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    _one_error_line(err, argv[0] if argv and argv[0] in COMMANDS else "")
    assert out == ""   # nothing ran


@pytest.mark.parametrize("argv,command", [
    (["-m", "kvlab", "sweep", "--types", "Q9_9"], "sweep"),
    (["-m", "kvlab", "report", "--out", "/"], "report"),
    (["-m", "kvlab.tp", "--pairs", "bogus/q8_0"], "tp"),
    (["-m", "kvlab.tp", "--nproc", "two"], "tp"),
])
def test_user_errors_in_a_fresh_process(argv, command):
    res = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    line = _one_error_line(res.stderr, command)
    assert "Q9_9" in line or "--out" in line or "bogus" in line or "two" in line


def test_messages_name_what_is_wrong(capsys, tmp_path):
    cases = {("sweep", "--types", "Q9_9"): "unknown KV type 'Q9_9': expected one of f32, f16",
             ("trace", "--fa-quants", "bogus"): "GGML_CUDA_FA_QUANTS: 'bogus'",
             ("report", "--out", str(tmp_path)): "is a directory",
             ("eval", "--tiny", "--text", str(tmp_path / "nope.txt")): "--text",
             ("sweep", "--data", "minilm", "--lengths", "1024"): "512 tokens, but --lengths go to 1024"}
    for argv, words in cases.items():
        assert main(list(argv)) == 2
        assert words in capsys.readouterr().err


def test_llama_cpp_spellings_and_any_case():
    parser = build_parser()
    for argv in (["-ctk", "Q8_0", "-ctv", "q4_0"], ["--cache-type-k", "q8_0", "--cache-type-v", "Q4_0"],
                 ["--ctk", "q8_0", "--ctv", "q4_0"]):
        args = parser.parse_args(["trace", *argv])
        assert (args.type_k, args.type_v) == ("q8_0", "q4_0")
    for flag in ("-ub", "--ubatch-size", "--n-tokens"):
        assert parser.parse_args(["trace", flag, "7"]).n_tokens == 7
    args = parser.parse_args(["sweep", "--types", "Q4_0,IQ4_NL", "-ctv", "F16,q8_0"])
    assert (args.types, args.type_k, args.type_v) == (("q4_0", "iq4_nl"), None, ("f16", "q8_0"))
    args = parser.parse_args(["eval", "--tiny", "--text", "x", "--pairs", "Q4_0/q8_0,q8_0", "-c", "64", "-b", "16"])
    assert (args.pairs, args.ctx, args.batch) == ((("q4_0", "q8_0"), ("q8_0", "q8_0")), 64, 16)
    args = parser.parse_args(["eval", "--tiny", "--text", "x", "--ctx-size", "64", "--batch-size", "16"])
    assert (args.ctx, args.batch) == (64, 16)
    assert len(parser.parse_args(["eval", "--tiny", "--text", "x", "--pairs", "all"]).pairs) == 81
    assert parser.parse_args(["compat", "--devices", "1,2,4"]).devices == (1, 2, 4)
    assert parser.parse_args(["compat", "--era", "flatten,pr23792"]).era == ("flatten", "pr23792")
    assert parser.parse_args(["tp", "--pairs", "Q8_0/q4_0,f16"]).pairs == "q8_0/q4_0,f16/f16"


def test_sweep_reads_the_k_and_v_lists(tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["sweep", "--lengths", "32", "--n-q", "2", "-ctk", "Q4_0", "--cache-type-v", "f16,q8_0",
                 "--flavors", "ref", "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    import pandas as pd
    table = pd.read_csv(out)
    assert sorted(set(zip(table.type_k, table.type_v))) == [("q4_0", "f16"), ("q4_0", "q8_0")]


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert COMMANDS <= set(commands)
    for name, sub in commands.items():
        formatter = HelpFormatter(f"kvlab {name}")
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"kvlab {name} {action.option_strings[0]} has no help"
            if action.nargs != 0 and action.default is not None:
                assert "(default: " in formatter._get_help_string(action), (name, action.option_strings)
        assert "Lists are comma separated" in sub.format_help() and "exit status: 0" in sub.format_help()
    report_help = " ".join(commands["report"].format_help().split())   # unwrapped
    assert "(default: 128,512,2048,8192; with --data, those the sample holds)" in report_help
    assert "(default: 0)" in commands["sweep"].format_help() and "(default: 8)" in report_help


def test_version_help_and_python_m_kvlab(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"kvlab {kvlab.__version__}"
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "exit status: 0" in top and "-ctk/--cache-type-k" in top
    res = subprocess.run([sys.executable, "-m", "kvlab", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"kvlab {kvlab.__version__}"


def test_trace_exits_1_when_cuda_does_not_run_the_pair(capsys):
    # iq4_nl has no CUDA FA kernel at all; the split rules of pr23792 pass it
    assert main(["trace", "-ctk", "iq4_nl", "-ctv", "iq4_nl"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT RUN" in out and "STOP" not in out
    assert main(["trace", "-ctk", "iq4_nl", "-ctv", "iq4_nl", "--format", "json"]) == 1
    nodes = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    fa = [n for n in nodes if n["op"] == "FLASH_ATTN_EXT"]
    assert len(fa) == 1 and fa[0]["cuda_runs"] is False and "error" not in nodes[-1]
    assert main(["trace", "-ctk", "q8_0", "-ctv", "q8_0"]) == 0
    assert "CUDA flash attention (0.3.36): runs" in capsys.readouterr().out


def test_layer_growth_is_cached(tmp_path, monkeypatch):
    from kvlab.accuracy import depth
    cfg = depth.StackConfig(n_layers=2, n_tokens=32)
    pairs = [("q4_0", "f16")]
    first = depth.layer_growth(pairs, cfg, cache_dir=tmp_path)
    files = sorted((tmp_path / "depth").glob("*.parquet"))
    assert len(files) == 2   # one per rotation
    monkeypatch.setattr(depth, "exact_stack", lambda *a: pytest.fail("the cache was not read"))
    again = depth.layer_growth(pairs, cfg, cache_dir=tmp_path)
    assert again.equals(first)
    files[0].write_bytes(b"PAR1 truncated")
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="unreadable"):
        redone = depth.layer_growth(pairs, cfg, cache_dir=tmp_path)
    assert redone.equals(first)
    other = depth.layer_growth(pairs, depth.StackConfig(n_layers=3, n_tokens=32), cache_dir=tmp_path)
    assert len(other) == 2 * 3 and len(list((tmp_path / "depth").glob("*.parquet"))) == 4


def test_progress_clock_starts_after_the_first_item():
    from kvlab._progress import progress_bar
    with progress_bar(10, "t", "cell", enabled=True) as bar:
        created = bar.start_t
        bar.update(3)                       # the JIT-paying first item: counted, but not timed
        assert (bar.n, bar.initial) == (3, 3) and bar.start_t >= created
        assert bar.format_dict["rate"] is None
        bar.update(2)
        assert bar.n == 5
    assert "K" not in bar.format_meter(5, 10, 2.0, unit="cell")   # 2.50cell/s, never 2.5Kcell/s


def test_captured_sample_ships_with_the_package():
    sample = kvlab.accuracy.sample.captured_sample()
    assert sample.name == "all-MiniLM-L6-v2 layer 0" and sample.k.shape == (12, 512, 32)
    assert sample.q.dtype == np.float32 and np.array_equal(sample.q_positions, np.arange(512))


LIGHT_REPORT = """
import sys
for name in ("torch", "transformers", "ipywidgets", "IPython", "jupyterlab", "pytest", "numba.cuda"):
    sys.modules[name] = None   # as if not installed (what `make report` leaves out)
from kvlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_report_runs_on_the_light_core(tmp_path):
    """`make report` installs numpy, numba, pandas, pyarrow, plotly and tqdm only: the report, on the
    captured sample too, must not need torch, transformers or Jupyter."""
    out = tmp_path / "r.html"
    res = subprocess.run([sys.executable, "-c", LIGHT_REPORT, "report", "--quick", "--data", "minilm",
                          "--types", "q4_0,f16", "--flavors", "ref", "--layers", "1", "--layer-tokens", "32",
                          "--out", str(out), "--cache-dir", str(tmp_path / "c"), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.stat().st_size > 100_000 and "all-MiniLM-L6-v2 layer 0" in out.read_text()


def test_data_takes_the_default_lengths_it_holds():
    from kvlab.cli.options import sweep_inputs
    cfg, sample = sweep_inputs(build_parser().parse_args(["sweep", "--data", "minilm", "--types", "q4_0"]))
    assert cfg.lengths == (128, 512) and sample.name == "all-MiniLM-L6-v2 layer 0"
    assert sweep_inputs(build_parser().parse_args(["sweep", "--types", "q4_0"]))[0].lengths == (128, 512, 2048, 8192)
    cfg, _ = sweep_inputs(build_parser().parse_args(["report", "--data", "minilm"]), lengths=(64, 256), n_q=2)
    assert (cfg.lengths, cfg.n_q) == ((64, 256), 2)
