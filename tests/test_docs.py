"""The pages under docs/ run as written: each page's Python blocks, in order."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_python_blocks_run(page):
    namespace = {"__name__": f"docs.{page.stem}"}
    for code in _python_blocks(page.read_text()):
        if code.startswith("# not run"):  # a sketch, e.g. one that needs many hosts
            continue
        exec(compile(code, str(page), "exec"), namespace)


def test_readme_links_every_page():
    readme = (ROOT / "README.md").read_text()
    for page in PAGES:
        assert f"docs/{page.name}" in readme, f"README.md does not link {page.name}"
