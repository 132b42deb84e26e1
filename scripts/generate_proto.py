"""Compile ``schemas/FlightSql.proto`` into ``flight_lakehouse/flight_sql_pb2.py``.

Usage::

    python -m scripts.generate_proto           # (re)write the generated module
    python -m scripts.generate_proto --check   # exit 1 if the committed files differ, without writing

Needs the dev extra's ``grpcio-tools`` (its bundled ``protoc``). The ``.proto`` is staged as
``flight_lakehouse/flight_sql.proto`` so that protoc names the module ``flight_lakehouse.flight_sql_pb2``
(the classes' ``__module__``); type URLs depend only on the package and message names, not on that path.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_SOURCE = ROOT / "schemas" / "FlightSql.proto"
PACKAGE_DIR = ROOT / "flight_lakehouse"
STAGED_PROTO = "flight_lakehouse/flight_sql.proto"
#: No ``.pyi`` stub: 800 lines of repeated shapes, and the server reads the messages' fields by name.
GENERATED = ("flight_sql_pb2.py",)


def well_known_protos() -> Path:
    """The directory of ``google/protobuf/*.proto`` that grpcio-tools ships."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


def generate(work_dir: Path) -> dict[str, bytes]:
    """Compile the proto inside ``work_dir``; the generated files' bytes, keyed by file name."""
    source_root, out_root = work_dir / "src", work_dir / "out"
    staged = source_root / STAGED_PROTO
    staged.parent.mkdir(parents=True)
    out_root.mkdir()
    shutil.copyfile(PROTO_SOURCE, staged)
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={source_root}",
        f"--proto_path={well_known_protos()}",
        f"--python_out={out_root}",
        STAGED_PROTO,
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    out_dir = out_root / Path(STAGED_PROTO).parent
    return {name: (out_dir / name).read_bytes() for name in GENERATED}


def drifted(directory: Path, expected: dict[str, bytes]) -> list[str]:
    """Names of the files in ``directory`` that are missing or differ from ``expected``."""
    return [
        name
        for name, content in expected.items()
        if not (directory / name).is_file() or (directory / name).read_bytes() != content
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description="Generate flight_lakehouse/flight_sql_pb2.py.")
    parser.add_argument("--check", action="store_true", help="report drift and exit 1 instead of writing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flight-sql-proto-") as work:
        expected = generate(Path(work))
    if args.check:
        stale = drifted(PACKAGE_DIR, expected)
        for name in stale:
            print(f"drifted: flight_lakehouse/{name}", file=sys.stderr)
        if stale:
            print("run: python -m scripts.generate_proto", file=sys.stderr)
            return 1
        print("flight_sql_pb2 up to date")
        return 0
    for name, content in expected.items():
        (PACKAGE_DIR / name).write_bytes(content)
    print(f"wrote {', '.join(f'flight_lakehouse/{name}' for name in expected)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
