"""Fuzzing at volume (issue 18, point 6): ``tests/test_fuzz.py`` with ``--examples`` inputs instead of the
suite's few hundred.

Runs the fuzz module in a pytest child process with ``FUZZ_EXAMPLES`` (spread over the targets in
proportion to their suite counts) and ``FUZZ_REPORT``, then prints per target the calls made (a target's
input may make several calls) by outcome, the time, the server's open files, threads and RSS after warm-up
and at the end, and the internal errors of its log. A crash, an unclean refusal, a changed dataset or a
leak fails the pytest run, whose falsifying example hypothesis prints; the exit code is pytest's.

Usage::

    python -m scripts.fuzz [--examples 10000] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(examples: int, seed: int | None) -> tuple[int, dict, float]:
    """Run the fuzz module; return pytest's exit code, the report and the seconds taken."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        env = {**os.environ, "FUZZ_EXAMPLES": str(examples), "FUZZ_REPORT": str(report)}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"]
        if seed is not None:
            command.append(f"--hypothesis-seed={seed}")
        started = time.monotonic()
        code = subprocess.call(command, env=env, cwd=Path(__file__).resolve().parent.parent)
        seconds = time.monotonic() - started
        return code, json.loads(report.read_text()) if report.exists() else {}, seconds


def table(report: dict) -> str:
    """Markdown rows: target, calls, outcomes, seconds."""
    lines = ["| target | calls | outcomes | seconds |", "|---|---:|---|---:|"]
    for target, outcomes in report.get("outcomes", {}).items():
        spelled = ", ".join(f"{status} {count}" for status, count in sorted(outcomes.items()))
        seconds = report.get("seconds", {}).get(target, "")
        lines.append(f"| {target} | {sum(outcomes.values()):,} | {spelled} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=10_000, help="inputs in all (default 10,000)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = parser.parse_args()
    code, report, seconds = run(args.examples, args.seed)
    print(table(report))
    calls = sum(sum(outcomes.values()) for outcomes in report.get("outcomes", {}).values())
    print(f"\n{args.examples:,} inputs asked, {calls:,} calls in {seconds:.0f} s; pytest exit code {code}")
    for moment in ("warm", "end"):
        print(f"server {moment}: {report.get(moment)}")
    print(f"internal errors in the server log: {len(report.get('internal', []))}")
    print(f"slowest calls (s, target, outcome): {report.get('slowest', [])[-3:]}")
    sys.exit(code)


if __name__ == "__main__":
    main()
