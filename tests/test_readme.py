"""The README's commands and code run as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _command(block):
    """A shell block as one line: its ``\\`` continuations joined."""
    return re.sub(r"\s*\\\n\s*", " ", block.strip())


def test_readme_python_blocks_run(capsys):
    blocks = _blocks("python")
    assert blocks
    namespace = {"__name__": "readme"}  # one after the other, as a reader runs them
    for code in blocks:
        exec(compile(code, "README.md", "exec"), namespace)


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    commands = [_command(b) for b in _blocks("bash")]
    main_job, tests = commands[0], commands[1]
    assert main_job.endswith("-m samx.examples.compare")
    assert tests.endswith("-m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, "`.ci/run` must run exactly the README's test command"


def test_ci_builds_the_docs_with_the_readme_command():
    (docs,) = [_command(b) for b in _blocks("bash") if "sphinx-build" in b]
    assert " -W " in docs and docs.endswith("docs/check_api.py docs/_build/html")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert docs in ci, "`.ci/run` must run exactly the README's docs command"
