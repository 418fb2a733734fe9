"""Executes notebooks in full mode and saves them with their outputs, in place.

Usage: ``python notebooks/execute.py [NAME ...]``, a name being a notebook's
file name or its start (``01`` for ``01_quickstart.ipynb``); no name runs every
notebook in this folder. Quick mode
(``SAMX_QUICK=1``) is what the test suite uses; this script clears it, so the
saved outputs are those of a full run.
"""

import os
import pathlib
import sys
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def notebooks(names: list[str]) -> list[pathlib.Path]:
    """The notebook paths for ``names`` (every notebook when empty)."""
    if not names:
        return sorted(HERE.glob("*.ipynb"))
    paths = []
    for name in names:
        stem = pathlib.Path(name).name.removesuffix(".ipynb")
        found = sorted(HERE.glob(f"{stem}*.ipynb"))  # "01" finds 01_quickstart
        exact = [p for p in found if p.stem == stem]
        if len(exact or found) != 1:
            raise SystemExit(f"{name!r} names {len(found)} notebooks in {HERE}")
        paths.append((exact or found)[0])
    return paths


def execute(path: pathlib.Path, timeout: int = 1200) -> nbformat.NotebookNode:
    """Runs ``path`` top to bottom in a fresh kernel from its own folder."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    return nb


def main(argv: list[str]) -> None:
    os.environ.pop("SAMX_QUICK", None)  # full mode: the saved outputs
    for path in notebooks(argv):
        start = time.perf_counter()
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"{path.name}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
