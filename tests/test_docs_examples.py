"""The Python examples in README.md and docs/*.md run as written."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_examples_run(path):
    blocks = python_blocks(path)
    if path.name == "README.md":
        assert blocks, "README.md should show a usage example"
    for block in blocks:
        exec(compile(block, str(path), "exec"), {"__name__": "__doc_example__"})
