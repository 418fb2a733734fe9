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


def _includes():
    """Each include of a page: (page, included file, start-after, end-before)."""
    for page in PAGES:
        for body in re.findall(r"```\{include\} (.*?)```", page.read_text(), re.S):
            path, *options = body.strip().splitlines()
            marks = dict(
                re.findall(
                    r'^:(start-after|end-before): "(.*)"$', "\n".join(options), re.M
                )
            )
            yield (
                page,
                page.parent / path,
                marks.get("start-after"),
                marks.get("end-before"),
            )


@pytest.mark.parametrize(
    "include", list(_includes()), ids=lambda i: f"{i[0].name}:{i[1].name}"
)
def test_included_parts_are_found(include):
    # The site takes the README's parts between these markers (and the
    # notebooks' README): editing it must keep them, in order.
    page, path, start, end = include
    text = path.read_text()
    assert start is None or text.count(start) == 1, f"{page.name}: {start!r} not once"
    assert end is None or text.count(end) == 1, f"{page.name}: {end!r} not once"
    if start and end:
        assert text.index(start) < text.index(end), f"{page.name}: markers out of order"


def test_every_notebook_is_on_the_notebooks_page():
    page = (ROOT / "docs" / "notebooks.md").read_text()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{notebook.stem}\n" in page, (
            f"docs/notebooks.md lacks {notebook.name}"
        )


# Furo's code blocks show 90 characters before they scroll (measured in
# Chromium at windows 1100 to 1920 px wide); ruff formats Python to 88.
CODE_WIDTH = 88


def _code_lines(text):
    """The lines of the fenced code blocks of ``text``, not of MyST directives."""
    lines, fence = [], None
    for line in text.splitlines():
        if fence is None:
            if line.startswith("```"):
                fence = line[3:].strip()
        elif line.startswith("```"):
            fence = None
        elif not fence.startswith("{"):
            lines.append(line)
    return lines


def _shown(page):
    """A page's text, and the parts of other files that it includes."""
    texts = [page.read_text()]
    for including, path, start, end in _includes():
        if including == page:
            text = path.read_text()
            text = text.split(start, 1)[1] if start else text
            texts.append(text.split(end, 1)[0] if end else text)
    return texts


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_lines_fit_the_page(page):
    wide = [
        line
        for text in _shown(page)
        for line in _code_lines(text)
        if len(line) > CODE_WIDTH
    ]
    assert not wide, f"{page.name}: code lines over {CODE_WIDTH} characters: {wide}"
