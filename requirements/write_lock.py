"""Write the exact versions installed in a venv as a pip constraints file (`make lock`), or show how they
differ from the committed lock (`make test-latest`).

    python requirements/write_lock.py VENV_PYTHON requirements/constraints.txt   # write, atomically
    python requirements/write_lock.py VENV_PYTHON - --diff requirements/constraints.txt

Local version labels are dropped (`torch==2.13.0+cpu` -> `torch==2.13.0`): a constraint without one accepts
the CPU build on disk and the CUDA build alike. deltatune itself (installed editable) is left out.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HEADER = """\
# Exact versions `make setup` installs (pip constraints: `pip install -c requirements/constraints.txt ...`).
# Tested with the full suite on Python {python}, {system} {machine}. Regenerate with `make lock`, then run
# `make test` and commit both; never edit by hand.
"""


def installed(python: str) -> list[str]:
    out = subprocess.run(
        [python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    pins = []
    for line in out.splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        name, version = line.split("==", 1)
        pins.append(f"{name.lower()}=={version.split('+', 1)[0]}")
    return sorted(pins)


def pins_of(lock: Path) -> dict[str, str]:
    lines = [line.strip() for line in lock.read_text().splitlines()]
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("python", help="the venv's python")
    parser.add_argument("out", help="the lock file to write, or - for standard output")
    parser.add_argument("--diff", type=Path, help="print how the venv differs from this lock instead")
    args = parser.parse_args()
    pins = installed(args.python)
    if args.diff is not None:
        locked, now = pins_of(args.diff), dict(p.split("==", 1) for p in pins)
        names = sorted(n for n in locked.keys() | now.keys() if locked.get(n) != now.get(n))
        changed = [f"{n}: {locked.get(n, '-')} -> {now.get(n, '-')}" for n in names]
        print("newest allowed releases vs the lock:", *(changed or ["none differ"]), sep="\n  ")
        return 0
    version = subprocess.run(
        [args.python, "-c", "import platform; print(platform.python_version())"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    text = HEADER.format(python=version, system=platform.system(), machine=platform.machine())
    text += "\n".join(pins) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    print(f"wrote {out}: {len(pins)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
