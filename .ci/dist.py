"""CI helpers for the build leg (run by .ci/lowest-and-wheel, standard library only).

python3 .ci/dist.py check DIST_DIR   # what the sdist and the wheel ship
python3 .ci/dist.py example          # prints the README's first Python block
"""

import pathlib
import re
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _one(dist: pathlib.Path, pattern: str) -> pathlib.Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        sys.exit(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def check(dist: pathlib.Path) -> None:
    """The wheel ships the package, py.typed and LICENSE; the sdist what builds it."""
    wheel = _one(dist, "samx-*.whl")
    sdist = _one(dist, "samx-*.tar.gz")
    wheel_names = zipfile.ZipFile(wheel).namelist()
    with tarfile.open(sdist) as tar:
        # "samx-0.1.0.dev0/samx/_sam.py" -> "samx/_sam.py"
        sdist_names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    problems = []
    for needed in ("samx/__init__.py", "samx/py.typed", "samx/runtime/__init__.py"):
        if needed not in wheel_names:
            problems.append(f"the wheel lacks {needed}")
    if not any(
        re.fullmatch(r"samx-[^/]+\.dist-info/licenses/LICENSE", n) for n in wheel_names
    ):
        problems.append("the wheel lacks LICENSE in its dist-info")
    stray = sorted({n.split("/")[0] for n in wheel_names} - {"samx"})
    stray = [n for n in stray if not n.endswith(".dist-info")]
    if stray:
        problems.append(f"the wheel ships more than samx: {stray}")
    for needed in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "pyproject.toml",
        "samx/__init__.py",
        "samx/py.typed",
        "tests/conftest.py",
    ):
        if needed not in sdist_names:
            problems.append(f"the sdist lacks {needed}")
    if problems:
        sys.exit("\n".join(problems))
    print(f"{wheel.name}: {len(wheel_names)} files; {sdist.name}: {len(sdist_names)}")


def example() -> None:
    """The first ```python block of README.md, which needs only jax and optax."""
    readme = (ROOT / "README.md").read_text()
    print(re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0], end="")


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"] and len(sys.argv) == 3:
        check(pathlib.Path(sys.argv[2]))
    elif sys.argv[1:] == ["example"]:
        example()
    else:
        sys.exit(__doc__)
