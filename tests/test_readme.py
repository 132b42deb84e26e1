"""The README's Python examples work: each block that talks to ``127.0.0.1:8815`` runs, in the order the
README shows them, in a process of its own against a real server (its address put in their place)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_ADDRESS = "127.0.0.1:8815"


def examples() -> list[str]:
    """The README's Python blocks that talk to the default address, in order."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    return [block for block in blocks if DEFAULT_ADDRESS in block]


def test_the_readme_has_examples_to_run() -> None:
    assert len(examples()) >= 4  # pyarrow, ADBC, SQLAlchemy, vector search


@pytest.mark.parametrize("storage_root", ["local"], indirect=True)
def test_every_readme_example_runs(server: ServerProcess) -> None:
    address = server.location.removeprefix("grpc://")
    for number, example in enumerate(examples(), start=1):
        code = example.replace(DEFAULT_ADDRESS, address)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"README example {number} failed:\n{code}\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"README example {number} printed nothing"
