"""The engines' own virtual environment, ``.venv-engines/`` in the repository root: Daft and Ray Data (and
what they read Iceberg and Lance with) need a pyarrow older than the server's, so they run as engines on
another machine would, in their own Python, on the same tables.

``python -m tests.engines_venv`` creates it (``.ci/run`` does, after the main install); the fixture of
``tests/test_engines.py`` creates it too when it is missing or was made for other requirements, so the
test never skips for want of it. A lock file keeps parallel test workers from building it twice.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: What the engines' environment holds (pinned: the test compares engines' answers, not their upgrades).
REQUIREMENTS = (
    "daft[lance]==0.7.26",
    "pyarrow>=21,<26",
    "pyiceberg[sql-sqlite]==0.12.0",
    "pylance==14.0.2",
    "ray[data]==2.60.0",
)
VENV = Path(__file__).resolve().parents[1] / ".venv-engines"
#: Written last: the environment is complete and holds exactly these requirements.
MARKER = "lakehouse-requirements.txt"


def ensure(venv: Path = VENV, requirements: tuple[str, ...] = REQUIREMENTS) -> Path:
    """The Python of the environment at ``venv``, created (or re-created) first when needed."""
    python = venv / "bin" / "python"
    wanted = "\n".join(requirements) + "\n"
    marker = venv / MARKER
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and marker.exists() and marker.read_text() == wanted:
            return python
        started = time.monotonic()
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
        subprocess.run([*pip, "install", *requirements], check=True)
        marker.write_text(wanted)
        print(f"created {venv} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return python


if __name__ == "__main__":
    print(ensure())
