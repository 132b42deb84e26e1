"""The README's Python examples work: each block that talks to ``127.0.0.1:8815`` (Flight) or
``127.0.0.1:8816`` (the HTTP port) runs, in the order the README shows them, in a process of its own
against a real server (its addresses put in their place); then so does each of its curl commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerProcess

README = Path(__file__).resolve().parents[1] / "README.md"
DEFAULT_ADDRESS = "127.0.0.1:8815"
DEFAULT_HTTP_ADDRESS = "127.0.0.1:8816"


def examples() -> list[str]:
    """The README's Python blocks that talk to a default address, in order."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    return [block for block in blocks if DEFAULT_ADDRESS in block or DEFAULT_HTTP_ADDRESS in block]


def curl_commands() -> list[str]:
    """The README's curl commands to the HTTP port, but those that need credentials (a server with auth)."""
    lines = re.findall(r"^curl -s http://127\.0\.0\.1:8816/.*$", README.read_text(), re.MULTILINE)
    return [line.split("  #")[0] for line in lines]


def test_the_readme_has_examples_to_run() -> None:
    assert len(examples()) >= 4  # pyarrow, ADBC, SQLAlchemy, vector search
    assert len(curl_commands()) >= 6  # probes, metrics, datasets, the three formats


@pytest.mark.parametrize("storage_root", ["local"], indirect=True)
def test_every_readme_example_runs(server: ServerProcess, tmp_path: Path) -> None:
    address = server.location.removeprefix("grpc://")
    http_address = server.http_url.removeprefix("http://")
    for number, example in enumerate(examples(), start=1):
        code = example.replace(DEFAULT_ADDRESS, address).replace(DEFAULT_HTTP_ADDRESS, http_address)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"README example {number} failed:\n{code}\n{done.stderr[-3000:]}"
        assert done.stdout.strip(), f"README example {number} printed nothing"
    run_curl_commands(http_address, tmp_path)


def run_curl_commands(http_address: str, workdir: Path) -> None:
    """Each README curl command (after the Python examples made the ``jobs`` dataset) succeeds with output;
    ``--fail`` makes an HTTP error status a failure, ``pipefail`` the curl before a ``| grep``."""
    for command in curl_commands():
        line = command.replace("curl -s ", "curl -sS --fail ").replace(DEFAULT_HTTP_ADDRESS, http_address)
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {line}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=workdir,
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        assert done.stdout.strip() or " -o " in line, command
    assert (workdir / "jobs.arrows").stat().st_size > 0
