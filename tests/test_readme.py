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


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_python_examples_run(capsys):
    namespace = {}
    # the blocks build on each other, in order; ```py blocks (More than one machine) need a
    # Dask cluster and are not run here (tests/test_dask.py runs that code on a LocalCluster)
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["report"].all_hold
    assert namespace["result"].history.loss[-1] < namespace["result"].history.loss[0]
