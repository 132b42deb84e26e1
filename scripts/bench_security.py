"""Security benchmark: the cost of authentication and TLS, next to the same server without them.

Three servers over the same data, in one run: **plain** ``grpc://`` without auth (the anchor),
**auth** (``--auth-file``, a bearer token from one Basic login sent on every call) and **auth+TLS**
(the same, plus ``--tls-cert``/``--tls-key`` from a ``trustme`` CA; ``grpc+tls://``).

* Data: the workers rows ingested once by one DoPut into the plain server's root; then the two other
  servers start on that same root. The three run at once (so that every repeat can interleave them), read
  only: SQLite lets readers share a catalog, and the servers read the same Parquet files from the same
  page cache, which is fairer than copies (the catalog keeps absolute paths, so a copy of a root would
  read the original files anyway).
* Full scan: ``select * from workers`` through DoGet, drained batch by batch, the servers in turn in every
  repeat (after one warm-up each); medians of ``--repeats``; ratio = time / the plain server's time.
* Small query: p50 and p99 of ``--runs`` executions per repeat, the three servers taking turns per
  execution (load that comes and goes hits all three alike); the difference of the medians in ms. By
  default ``select count(*) from workers``, answered from the Parquet footers: the per-call cost is most
  of it, so the difference varies less than over a query that reads a row group (``--small-sql``). Turns
  rotate by one server each time (scan repeats too), so none always follows the same other one. The
  servers' result cache is off (``LAKEHOUSE_RESULT_CACHE_MB=0``, unless ``--env`` sets it), so every
  execution runs the query instead of answering the same SQL from memory.
* Login (informational): a new client's connection and Basic handshake (``authenticate_basic_token``;
  TLS's handshake included) of each of :data:`LOGINS` users once per server: a handshake always checks
  the password (argon2id); users of their own leave the measuring user's sessions alone.

The clients run in this process, as in ``bench_core`` and ``bench_flight_sql``; the CPU of each server
and of this process are rows of the table. Targets: scan ratio <= 1.10 and small-query p50 at most
0.3 ms above the plain server, both for auth and for auth+TLS. Needs ``trustme`` (the ``dev`` extra).

Usage::

    python -m scripts.bench_security [--rows 1000000] [--repeats 5] [--runs 300] [--root DIR]
        [--small-sql SQL] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.flight as flight

from scripts import harness, workloads
from scripts.bench_flight_sql import Cpu, CpuMeter, Latency, Samples, samples
from scripts.harness import log, median, spread, verdict

SMALL_SQL = "select count(*) from workers"
SERVER_ENV = {"LAKEHOUSE_RESULT_CACHE_MB": "0"}  # every small query runs, none is answered from memory
WARMUP_RUNS = 10
LOGINS = 5  # per server, each by a user of its own
SCAN_TARGET = 1.10
SMALL_TARGET_MS = 0.3
PLAIN, AUTH, TLS = "plain", "auth", "auth+TLS"
CONTENDERS = (PLAIN, AUTH, TLS)
SECURED = (AUTH, TLS)
#: The command line's counts (each must be > 0): flag, default, meaning.
COUNTS = (
    ("--rows", 1_000_000, "rows to generate"),
    ("--repeats", 5, "runs per measurement"),
    ("--runs", 300, "small-query executions per run"),
)


# -- servers and clients ---------------------------------------------------------------------------
class TlsServer(harness.Server):
    """The server with ``--tls-cert``/``--tls-key``: its ``ready at grpc+tls://`` line, location included."""

    def log_text(self) -> str:
        """The log, its TLS ready line restated as the harness's ready line."""
        return super().log_text().replace("ready at grpc+tls://", "ready at grpc://")

    def start(self, timeout: float = 60.0) -> TlsServer:
        """Start as the harness does; the location keeps its ``grpc+tls`` scheme."""
        super().start(timeout)
        self.location = self.location.replace("grpc://", "grpc+tls://", 1)
        return self


@dataclass(frozen=True)
class Credentials:
    """The auth file, the measuring user's password, the login users' passwords, the TLS files."""

    auth_file: Path
    password: str
    logins: dict[str, str]
    cert: Path
    key: Path
    ca_pem: bytes


def make_credentials(work: Path) -> Credentials:
    """A fresh auth file (reader ``bench`` and :data:`LOGINS` login users) and a certificate for 127.0.0.1."""
    try:
        import trustme
    except ImportError:
        raise SystemExit("trustme not found: python -m pip install -e '.[dev]'") from None
    from flight_lakehouse.auth import AuthFile

    auth_file = work / "auth.json"
    for stale in (auth_file, auth_file.with_name(auth_file.name + ".lock")):
        stale.unlink(missing_ok=True)
    users = {name: secrets.token_urlsafe(16) for name in ["bench", *(f"login{i}" for i in range(LOGINS))]}
    for name, password in users.items():
        AuthFile(auth_file).add_user(name, password, "reader")
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = work / "server-cert.pem", work / "server-key.pem"
    for i, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(cert), append=i > 0)
    issued.private_key_pem.write_to_path(str(key))
    password = users.pop("bench")
    return Credentials(auth_file, password, users, cert, key, ca.cert_pem.bytes())


def servers(work: Path, env: dict[str, str], creds: Credentials) -> dict[str, harness.Server]:
    """The three servers (not started) on the root ``work / "lakehouse"``."""
    root, auth = work / "lakehouse", ("--auth-file", str(creds.auth_file))
    tls = (*auth, "--tls-cert", str(creds.cert), "--tls-key", str(creds.key))
    return {
        PLAIN: harness.Server(root, work / "server-plain.log", env, name=PLAIN),
        AUTH: harness.Server(root, work / "server-auth.log", env, auth, name=AUTH),
        TLS: TlsServer(root, work / "server-tls.log", env, tls, name=TLS),
    }


@dataclass(frozen=True)
class Contender:
    """A client of one server, logged in when the server has auth: its call options carry the token."""

    name: str
    server: harness.Server
    client: flight.FlightClient
    options: flight.FlightCallOptions

    def query(self, sql: str) -> int:
        """Run ``sql`` through DoGet, reading batch by batch and keeping nothing; the row count."""
        reader = self.client.do_get(flight.Ticket(json.dumps({"sql": sql}).encode()), self.options)
        return harness.drain(lambda: reader.read_chunk().data)


def connect(server: harness.Server, creds: Credentials) -> flight.FlightClient:
    """A client of ``server`` (trusting the benchmark's CA over TLS)."""
    tls = {"tls_root_certs": creds.ca_pem} if server.location.startswith("grpc+tls") else {}
    return flight.connect(server.location, **tls)


def contender(name: str, server: harness.Server, creds: Credentials) -> Contender:
    """A client of ``server``, logged in as ``bench`` (Basic handshake) unless it is the plain server."""
    client = connect(server, creds)
    headers = [] if name == PLAIN else [client.authenticate_basic_token("bench", creds.password)]
    return Contender(name, server, client, flight.FlightCallOptions(headers=headers))


# -- measurements ----------------------------------------------------------------------------------
def in_turn(contenders: list[Contender], k: int) -> list[Contender]:
    """The contenders in the order of turn ``k``: rotated by one a turn, so no server always follows the
    same other one (whose clean-up after a call may still be running)."""
    shift = k % len(contenders)
    return contenders[shift:] + contenders[:shift]


def measure_scan(contenders: list[Contender], rows: int, repeats: int, cpu: Cpu) -> Samples:
    """Seconds per full scan, the servers in turn every repeat (after one warm-up each); CPU into ``cpu``."""
    scan = samples()
    for c in contenders:  # warm-up: page cache, the servers' snapshot databases
        c.query(workloads.SCAN_SQL)
    for i in range(repeats):
        for c in in_turn(contenders, i):
            with CpuMeter(c.server.pid) as meter:
                seconds, got = harness.timed(lambda c=c: c.query(workloads.SCAN_SQL))
            assert got == rows, (c.name, got, rows)
            scan[c.name].append(seconds)
            cpu.add(c.name, meter)
        log(f"scan #{i + 1}: " + ", ".join(f"{n} {scan[n][-1]:.3f} s" for n in CONTENDERS))
    return scan


def measure_small(contenders: list[Contender], sql: str, runs: int, repeats: int) -> Latency:
    """``repeats`` rounds of ``runs`` executions of ``sql``, the servers taking turns per execution."""
    out = Latency()
    for c in contenders:
        for _ in range(WARMUP_RUNS):
            c.query(sql)
    for i in range(repeats):
        seconds, round_cpu = samples(), Cpu()
        for j in range(runs):
            for c in in_turn(contenders, j):
                with CpuMeter(c.server.pid) as meter:
                    started = time.perf_counter()
                    c.query(sql)
                    seconds[c.name].append(time.perf_counter() - started)
                round_cpu.add(c.name, meter)
        for n in CONTENDERS:
            ms = np.array(seconds[n]) * 1e3
            out.p50_ms[n].append(float(np.percentile(ms, 50)))
            out.p99_ms[n].append(float(np.percentile(ms, 99)))
            out.cpu.server[n].append(float(np.mean(round_cpu.server[n])))
            out.cpu.local[n].append(float(np.mean(round_cpu.local[n])))
        figures = ", ".join(f"{n} {out.p50_ms[n][-1]:.2f}/{out.p99_ms[n][-1]:.2f}" for n in CONTENDERS)
        log(f"{sql[:40]!r} #{i + 1}, p50/p99 ms over {runs} runs: {figures}")
    return out


def measure_logins(contenders: list[Contender], creds: Credentials) -> Samples:
    """Milliseconds of a new client's connection + Basic handshake per login user, the secured servers in
    turn."""
    login_ms = samples()
    for user, password in creds.logins.items():
        for c in contenders:
            if c.name == PLAIN:
                continue
            with connect(c.server, creds) as client:
                started = time.perf_counter()
                client.authenticate_basic_token(user, password)
                login_ms[c.name].append((time.perf_counter() - started) * 1e3)
    log("login ms: " + ", ".join(f"{n} {median(v):.1f}" for n, v in login_ms.items()))
    return login_ms


# -- report ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One line of the table: medians per server, the secured servers against the plain one (the ratio of
    the medians, or with ``ms`` their difference in ms), and a target when ``limit`` is set (the ratio or
    the difference must stay below it)."""

    metric: str
    values: Samples
    digits: int
    ms: bool = False
    limit: float | None = None

    def vs_plain(self, name: str) -> float:
        """``name`` against the plain server: the ratio of the medians, or their difference."""
        value, plain = median(self.values[name]), median(self.values[PLAIN])
        return value - plain if self.ms else value / plain

    def render(self) -> str:
        """The markdown line."""
        cells = [f"{median(v):.{self.digits}f}" if (v := self.values[n]) else "-" for n in CONTENDERS]
        if not self.values[PLAIN]:
            compared = ["-", "-"]
        elif self.ms:
            compared = [f"{self.vs_plain(n):+.{self.digits}f} ms" for n in SECURED]
        else:
            compared = [f"{self.vs_plain(n):.2f}" for n in SECURED]
        target, verdicts = "-", "-"
        if self.limit is not None:
            target = f"< +{self.limit} ms" if self.ms else f"ratio <= {self.limit:.2f}"
            verdicts = " / ".join(verdict(self.vs_plain(n) <= self.limit) for n in SECURED)
        ranges = " / ".join(spread(self.values[n], self.digits) for n in CONTENDERS)
        return " | ".join(
            ["", self.metric, *cells, *compared, target, verdicts, f"<sub>{ranges}</sub> |"]
        ).strip()


def render(rows: list[Row], source: workloads.Source, args: argparse.Namespace) -> str:
    """The markdown table of medians with ratios or differences, targets and pass/fail."""
    header = (
        f"{source.rows:,} rows, {source.nbytes / 1e6:.0f} MB in Arrow memory; medians of {args.repeats} runs "
        f"(small query: p50 and p99 of {args.runs} executions per run; login: {LOGINS} users per server); "
        "vs plain = ratio of the medians (s), or their difference (ms)\n\n"
        "| metric | plain (anchor) | auth | auth+TLS | auth vs plain | auth+TLS vs plain | target "
        "| pass/fail (auth / auth+TLS) | <sub>min-max plain / auth / auth+TLS</sub> |\n"
        "|---|---:|---:|---:|---:|---:|---|---|---|\n"
    )
    return header + "\n".join(row.render() for row in rows) + "\n"


def cpu_rows(what: str, cpu: Cpu, scale: float, unit: str, digits: int) -> list[Row]:
    """The CPU rows of a measurement: its server process's and this process's (the client's)."""
    scaled = {
        side: {n: [value * scale for value in values[n]] for n in CONTENDERS}
        for side, values in (("server", cpu.server), ("client", cpu.local))
    }
    return [
        Row(f"CPU of the {side} per {what} ({unit})", v, digits, unit == "ms") for side, v in scaled.items()
    ]


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, text in COUNTS:
        parser.add_argument(flag, type=int, default=default, help=f"{text} (default %(default)s)")
    parser.add_argument("--small-sql", default=SMALL_SQL, help="the small query (default %(default)r)")
    harness.add_work_arguments(parser, "e.g. LAKEHOUSE_RESULT_CACHE_MB=64")
    args = parser.parse_args(argv)
    if min(args.rows, args.repeats, args.runs) <= 0:
        parser.error("--rows, --repeats and --runs must be > 0")
    return args


def run(work: Path, args: argparse.Namespace, env: dict[str, str]) -> str:
    """Generate the input, ingest it through the plain server, start the secured ones, measure, render."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**SERVER_ENV, **env}
    log(f"generating {args.rows:,} rows ...")
    source = workloads.generate_source(work / "workers-source.parquet", args.rows)
    creds = make_credentials(work)
    scan_cpu = Cpu()
    with contextlib.ExitStack() as stack:
        planned = servers(work, env, creds)
        plain = stack.enter_context(planned[PLAIN])
        with flight.connect(plain.location) as client:
            harness.checked_put(lambda: workloads.server_ingest(client, source), source.rows)
        for name in SECURED:  # started after the ingest: they read its snapshot, nobody writes any more
            stack.enter_context(planned[name])
        contenders = [contender(name, server, creds) for name, server in planned.items()]
        for c in contenders:
            stack.callback(c.client.close)
        log(", ".join(f"{c.name} at {c.server.location} (pid {c.server.pid})" for c in contenders))
        scan = measure_scan(contenders, args.rows, args.repeats, scan_cpu)
        small = measure_small(contenders, args.small_sql, args.runs, args.repeats)
        logins = measure_logins(contenders, creds)
    sql = args.small_sql
    rows = [
        Row(f"Full scan, {source.rows:,} rows (s)", scan, 3, limit=SCAN_TARGET),
        *cpu_rows("full scan", scan_cpu, 1.0, "s", 2),
        Row(f"`{sql}` p50 (ms)", small.p50_ms, 2, ms=True, limit=SMALL_TARGET_MS),
        Row(f"`{sql}` p99 (ms)", small.p99_ms, 2, ms=True),
        *cpu_rows("small query", small.cpu, 1e3, "ms", 2),
        Row("Login: new connection + Basic handshake (ms, informational)", logins, 1, ms=True),
    ]
    settings = ", ".join(f"{key}={value}" for key, value in env.items())
    return render(rows, source, args) + f"\n- server environment: {settings}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown table on stdout."""
    args = parse_args(argv)
    return harness.print_report(args, "bench-security-", lambda work, env: run(work, args, env))


if __name__ == "__main__":
    raise SystemExit(main())
