"""The README's examples run as written (so the README stays true)."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_quick_start_has_two_commands():
    quick = README.read_text().split("## Quick start", 1)[1]
    commands = _blocks("bash")[0].strip().splitlines()
    assert quick.index("```bash") < quick.index("##"), "the quick start's first block is its commands"
    assert commands == ['pip install . && lorakern demo', 'pip install ".[test]" && pytest']


# The Python blocks themselves run in tests/test_docs.py: each alone, in a fresh interpreter,
# with the numbers they quote checked against what they print.


# -- what a new reader needs (issue 12, item 8) ----------------------------------------------

def _text():
    return " ".join(README.read_text().split())  # one space for every run of whitespace


def test_no_issue_numbers():
    assert not re.search(r"\(?issue \d+\)?", README.read_text(), re.IGNORECASE)


def test_every_problem_of_the_examples_is_fitted():
    code = "\n".join(_blocks("python"))
    built = re.findall(r"^(\w+) = lorakern\.(?:Linear)?Problem\(", code, re.MULTILINE)
    fitted = set(re.findall(r"lorakern\.fit\((\w+),", code))
    assert len(built) >= 5 and set(built) <= fitted, f"built, never fitted: {set(built) - fitted}"


def test_quick_start_says_what_the_suite_and_the_first_run_cost():
    quick = " ".join(README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0].split())
    assert re.search(r"The suite takes about \d+ minutes", quick)
    assert "without a GPU" in quick and "skip (`pytest -rs` lists each skipped test with its reason)" in quick
    assert re.search(r"first step .* took [\d.-]+ s with an empty cache and [\d.-]+ s", quick)


def test_install_hints_agree_with_the_readme():
    """Each install command the README gives for an extra is one the error messages give."""
    import tomllib

    from lorakern import _cuda, _dask, digits, plot

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    hints = {"cuda": _cuda._INSTALL, "dask": _dask.INSTALL, "digits": digits.HINT, "plot": plot.PLOT_HINT}
    text = _text()
    for extra, hint in hints.items():
        assert extra in extras
        forms = {f'pip install "lorakern[{extra}]"', f'pip install ".[{extra}]"'}
        in_readme = {f for f in forms if f in text}
        assert in_readme, f"the README does not say how to install the {extra} extra"
        assert in_readme <= {f for f in forms if f in hint}, (
            f"the README installs {extra} with {sorted(in_readme)}, the error says: {hint}")
        # lorakern is not published: only the clone form installs it (issue 24)
        assert f'pip install ".[{extra}]"' in hint and f'"lorakern[{extra}]"' not in hint + text
    assert "zarr" in " ".join(extras["dask"])  # the Dask recipe reads zarr stores


def test_dask_settings_are_dask_settings_and_the_benchmarks():
    """The README's settings for workers that share cores name real Dask settings, and they
    are the ones benchmarks/dask_scaling.py runs with (QUIET)."""
    import importlib.util
    import textwrap

    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")  # registers the distributed.* defaults
    import yaml

    (block,) = _blocks("yaml")

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    settings = dict(flat(yaml.safe_load(textwrap.dedent(block))))
    missing = object()
    unknown = [key for key in settings if dask.config.get(key, default=missing) is missing]
    assert not unknown, f"not Dask settings: {unknown}"
    path = README.parent / "benchmarks" / "dask_scaling.py"
    spec = importlib.util.spec_from_file_location("dask_scaling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert settings == module.QUIET


def test_torch_extra_and_test_extra_resolve_the_same_torch():
    """One torch requirement in both extras (the README's `.[torch]` and CI's `.[test]`), and
    the README and docs/install.md give the CPU-only index for machines without a GPU."""
    import tomllib

    extras = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    torch_req = [r for r in extras["torch"] if r.startswith("torch")]
    test_req = [r for r in extras["test"] if r.startswith("torch")]
    assert torch_req == test_req and len(torch_req) == 1, (torch_req, test_req)
    cpu = 'pip install ".[torch]" --extra-index-url https://download.pytorch.org/whl/cpu'
    install = " ".join((README.parent / "docs" / "install.md").read_text().split())
    assert cpu in _text() and cpu in install
