"""Every name in a public module's ``__all__`` has an entry in the API pages.

    python docs/check_api.py docs/_build/html

Reads the built site's object inventory (``objects.inv``) and the ``__all__``
of every public module of samx: a module under ``samx/`` none of whose dotted
parts starts with an underscore, that assigns ``__all__`` a literal tuple or
list (read from the source, without importing the module). Exits non-zero,
naming each missing ``module.name``, if one is not described on a page under
``api/``, or naming each page whose text spells a type or a default out where
a short name reads (``Callable[[Array | ndarray | ...`` for
``optax.ScalarOrSchedule``, ``<class '...'>`` for ``nnx.Param``). The standard
library only.
"""

import ast
import html
import pathlib
import re
import sys
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def public_names() -> dict[str, list[str]]:
    """{module: its __all__} for every public module of samx that has one."""
    found = {}
    for path in sorted((ROOT / "samx").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(part.startswith("_") for part in parts):
            continue
        for node in ast.parse(path.read_text(), str(path)).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                found[".".join(parts)] = list(ast.literal_eval(node.value))
    return found


def inventory(html: pathlib.Path) -> dict[str, str]:
    """{name: page} of the Python objects in Sphinx's ``objects.inv`` (version 2)."""
    data = (html / "objects.inv").read_bytes()
    header, _, body = data.partition(b"zlib.\n")
    if not header.startswith(b"# Sphinx inventory version 2"):
        sys.exit(f"{html / 'objects.inv'}: not a version 2 Sphinx inventory")
    entries = {}
    for line in zlib.decompress(body).decode().splitlines():
        # "name domain:role priority uri display name", the name without spaces
        name, role, _, uri, *_ = line.split(" ", 4)
        if role.startswith("py:"):
            entries[name] = uri
    return entries


# What an API page must not show: a type alias expanded, a default's repr.
UNREADABLE = re.compile(
    r"Callable\[\[Array \| ndarray|<class '[^']*'>|<function [^>]*>| object at 0x"
)


def unreadable(site: pathlib.Path) -> list[str]:
    """``page: text`` for each API page that shows what ``UNREADABLE`` matches."""
    found = []
    for page in sorted((site / "api").rglob("*.html")):
        text = html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))
        found += [
            f"{page.relative_to(site)}: {m.group(0)}" for m in UNREADABLE.finditer(text)
        ]
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit(__doc__)
    entries = inventory(pathlib.Path(argv[0]))
    modules = public_names()
    missing = [
        f"{module}.{name}"
        for module, names in modules.items()
        for name in names
        if not entries.get(f"{module}.{name}", "").startswith("api/")
    ]
    if missing:
        print(
            f"{len(missing)} public name(s) missing from the API pages (docs/api/):",
            *missing,
            sep="\n  ",
        )
        return 1
    spelled_out = unreadable(pathlib.Path(argv[0]))
    if spelled_out:
        print(
            "API pages that spell a type or a default out (docs/conf.py:"
            " autodoc_type_aliases, autodoc_preserve_defaults):",
            *spelled_out,
            sep="\n  ",
        )
        return 1
    count = sum(map(len, modules.values()))
    print(f"every public name has its API page: {count} names of {', '.join(modules)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
