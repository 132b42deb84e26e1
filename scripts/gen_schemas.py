"""Write the JSON Schemas of the typed commands to ``schemas/``, or check that they are up to date.

Usage::

    python scripts/gen_schemas.py           # (re)write schemas/<name>.json for every published model
    python scripts/gen_schemas.py --check   # exit 1, listing drifted/missing/extra files, without writing
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from flight_lakehouse.commands import PUBLISHED_MODELS

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"


def render_schemas() -> dict[str, str]:
    """The text of every schema file, keyed by file name (``<name>.json``)."""
    return {
        f"{name}.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in sorted(PUBLISHED_MODELS.items())
    }


def compare(directory: Path, expected: dict[str, str]) -> list[str]:
    """One line per difference between ``directory``'s ``*.json`` files and ``expected``."""
    present = {path.name for path in directory.glob("*.json")} if directory.is_dir() else set()
    problems = [f"missing: {name}" for name in sorted(expected.keys() - present)]
    problems += [f"extra: {name}" for name in sorted(present - expected.keys())]
    problems += [
        f"drifted: {name}"
        for name in sorted(expected.keys() & present)
        if (directory / name).read_text(encoding="utf-8") != expected[name]
    ]
    return problems


def write(directory: Path, expected: dict[str, str]) -> None:
    """Write every schema and remove ``*.json`` files no model publishes any more."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("*.json"):
        if path.name not in expected:
            path.unlink()
    for name, text in expected.items():
        (directory / name).write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description="Generate schemas/*.json from the command models.")
    parser.add_argument("--check", action="store_true", help="report drift and exit 1 instead of writing")
    parser.add_argument("--dir", type=Path, default=SCHEMAS_DIR, help="output directory (default: schemas/)")
    args = parser.parse_args(argv)
    expected = render_schemas()
    if args.check:
        problems = compare(args.dir, expected)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run: python scripts/gen_schemas.py", file=sys.stderr)
            return 1
        print(f"{len(expected)} schemas up to date")
        return 0
    write(args.dir, expected)
    print(f"wrote {len(expected)} schemas to {args.dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
