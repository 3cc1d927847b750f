"""Every Python snippet in the README and the usage guide runs as written."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "lora_usage.md"]


def _snippets():
    for doc in DOCS:
        blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), re.S)
        for i, code in enumerate(blocks):
            yield pytest.param(code, id=f"{doc.name}-{i}")


@pytest.mark.parametrize("code", list(_snippets()))
def test_snippet_runs(code):
    exec(compile(code, "<doc snippet>", "exec"), {"__name__": "__doc_snippet__"})
