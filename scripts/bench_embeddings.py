"""Server-side embeddings benchmark (issue 22): ingest with ``embed``, search by text, recall by paraphrase.

* Texts: ``--rows`` short synthetic sentences (fixed seed), with an int ``id``.
* Server: ``python -m flight_lakehouse serve`` (builtin embedder) in a subprocess, stopped by pid. The
  clients run in a spawned process.
* Ingest: one DoPut of all texts with ``"embed": {"from": "body", "into": "vec"}`` (``mode: create``),
  against the anchor: the same model in this process (``OnnxEmbedder.builtin()``) embedding the same texts
  in the server's chunks of 1024, with the same threads. Rounds interleaved; medians; the ratio of the two
  throughputs per round, median over rounds (target >= 0.85). RSS: the server's idle, with the model
  loaded (by one ``embed`` call before the rounds) and its peak during ingest.
* Search: for each of ``--queries`` texts, back to back in the client process: the model embedding it,
  the search by that vector and the search by the text (DoGet tickets, in-memory serving); p50 of each,
  and the median over queries of text - vector - model (target < 1 ms).
* Recall@1: the 60 pairs of scripts/paraphrases.tsv; each of the 120 sentences, searched by its text among
  all of them, must find its partner first (the issue's protocol).

Usage::

    python -m scripts.bench_embeddings                       # 20k texts, 3 rounds
    python -m scripts.bench_embeddings --rows 2000 --rounds 1 --queries 50
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.embeddings import OnnxEmbedder
from flight_lakehouse.semantic import CHUNK_ROWS
from scripts import harness
from scripts.harness import MB, cell, log, median, verdict

#: Sentence pairs for recall@1, written for this benchmark (a sentence, a tab, a paraphrase of it).
PAIRS_FILE = Path(__file__).with_name("paraphrases.tsv")

WORDS = [
    "river",
    "market",
    "city",
    "garden",
    "engine",
    "music",
    "winter",
    "coffee",
    "bridge",
    "forest",
    "train",
    "school",
    "doctor",
    "window",
    "storm",
    "paper",
    "camera",
    "island",
    "kitchen",
    "planet",
    "summer",
    "letter",
    "museum",
    "bicycle",
    "ocean",
    "festival",
]
VERBS = ["builds", "sees", "paints", "moves", "finds", "opens", "carries", "follows", "repairs", "visits"]


def texts(rows: int, seed: int = 22) -> list[str]:
    """Short sentences of six to twelve words."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        words = rng.choice(WORDS, size=int(rng.integers(5, 11)))
        out.append(f"the {words[0]} {rng.choice(VERBS)} " + " ".join(words[1:]))
    return out


def client_ingest(location: str, dataset: str, table: pa.Table) -> float:
    """(Spawned process) one DoPut with embedding; its seconds."""
    client = flight.connect(location)
    command = {"ingest": {"dataset": dataset, "mode": "create", "embed": {"from": "body", "into": "vec"}}}
    seconds, _ = harness.checked_put(
        lambda: harness.do_put(client, command, table.schema, table.to_batches(65_536)), table.num_rows
    )
    return seconds


def client_search(location: str, queries: list[str]) -> tuple[list[float], list[float], list[float]]:
    """(Spawned process) per query, interleaved: the model embedding it here, the search by that vector,
    the search by its text (DoGet tickets); the three latency lists in ms."""
    client = flight.connect(location)
    model = OnnxEmbedder.builtin()
    model.embed(["warm up"])
    model_ms, vector_ms, text_ms = [], [], []
    for query in queries:
        started = time.perf_counter()
        vector = model.embed([query])[0]
        model_ms.append((time.perf_counter() - started) * 1e3)
        for body, out in (({"vector": vector.tolist()}, vector_ms), ({"query": query}, text_ms)):
            search = {"search": {"dataset": "bench", "k": 10, "columns": ["id"], **body}}
            ticket = flight.Ticket(json.dumps(search).encode())
            started = time.perf_counter()
            client.do_get(ticket).read_all()
            out.append((time.perf_counter() - started) * 1e3)
    return model_ms, vector_ms, text_ms


def paraphrase_pairs() -> list[tuple[str, str]]:
    """The sentence pairs of scripts/paraphrases.tsv (a sentence, a tab, a paraphrase of it)."""
    lines = PAIRS_FILE.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split("\t")) for line in lines if line.strip()]  # type: ignore[misc]


def recall_at_1(location: str) -> float:
    """The issue's protocol: both sentences of every pair in one dataset; each sentence searched by its
    text must find its partner first after itself."""
    client = flight.connect(location)
    sentences = [sentence for pair in paraphrase_pairs() for sentence in pair]  # partners: ids 2n, 2n+1
    table = pa.table({"id": range(len(sentences)), "body": sentences})
    command = {"ingest": {"dataset": "pairs", "embed": {"from": "body", "into": "vec"}}}
    harness.do_put(client, command, table.schema, table.to_batches())
    hits = 0
    for number, sentence in enumerate(sentences):
        body = {"dataset": "pairs", "query": sentence, "k": 2, "columns": ["id"]}
        found = client.do_get(flight.Ticket(json.dumps({"search": body}).encode())).read_all()
        nearest = [found_id for found_id in found.column("id").to_pylist() if found_id != number]
        hits += nearest[:1] == [number ^ 1]
    return hits / len(sentences)


def anchor(model: OnnxEmbedder, body: list[str]) -> float:
    """Seconds the model takes in this process over the texts, in the server's chunks."""
    started = time.perf_counter()
    for start in range(0, len(body), CHUNK_ROWS):
        model.embed(body[start : start + CHUNK_ROWS])
    return time.perf_counter() - started


def report(work: Path, env: dict[str, str], args: argparse.Namespace) -> str:
    body = texts(args.rows)
    table = pa.table({"id": pa.array(range(args.rows), pa.int64()), "body": body})
    model = OnnxEmbedder.builtin()
    model.embed(["warm up"])
    pool = multiprocessing.get_context("spawn").Pool(1)
    server_rates, anchor_rates, peaks = [], [], []
    with harness.Server(work / "root", work / "server.log", env=env) as server:
        client = flight.connect(server.location)
        bare = harness.RssSampler(server.pid).sample()
        warm_up = flight.Action("embed", json.dumps({"texts": ["warm up"]}).encode())
        list(client.do_action(warm_up))  # the model loads on first use: not part of the rounds
        loaded = harness.RssSampler(server.pid).sample()
        for number in range(args.rounds):
            anchor_rates.append(args.rows / anchor(model, body))
            if number:
                harness.action(client, "drop_dataset", {"dataset": "bench"})
            with harness.RssSampler(server.pid) as rss:
                seconds = pool.apply(client_ingest, (server.location, "bench", table))
            server_rates.append(args.rows / seconds)
            peaks.append(rss.peak)
            log(f"round {number}: server {server_rates[-1]:.0f}/s, in-process {anchor_rates[-1]:.0f}/s")
        harness.wait_served(client, "bench")
        queries = texts(args.queries, seed=23)
        model_ms, vector_ms, text_ms = pool.apply(client_search, (server.location, queries))
        recall = recall_at_1(server.location)
    pool.close()
    ratios = [served / local for served, local in zip(server_rates, anchor_rates, strict=True)]
    ratio = median(ratios)  # each round's pair ran back to back: a busy machine slows both alike
    # per query (its three timings back to back), so a busy machine's swings cancel
    overhead = median([t - v - m for t, v, m in zip(text_ms, vector_ms, model_ms, strict=True)])
    lines = [
        f"Server-side embeddings: {args.rows:,} texts, {args.rounds} rounds (medians), "
        f"{args.queries} queries",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| ingest with embed, texts/s | {cell(server_rates, 0)} | |",
        f"| same model in-process, texts/s | {cell(anchor_rates, 0)} | |",
        f"| ratio (median of rounds: {', '.join(f'{r:.2f}' for r in ratios)}) | {ratio:.2f} "
        f"| >= 0.85 {verdict(ratio >= 0.85)} |",
        f"| server RSS: idle, model loaded, peak during ingest, MB | {bare / MB:.0f}, {loaded / MB:.0f}, "
        f"{median(peaks) / MB:.0f} | |",
        f"| search by vector p50, ms | {cell(vector_ms, 2)} | |",
        f"| search by text p50, ms | {cell(text_ms, 2)} | |",
        f"| model alone p50 (one text, client process), ms | {cell(model_ms, 2)} | |",
        f"| text - vector - model, per query, median ms | {overhead:.2f} | < 1 {verdict(overhead < 1)} |",
        f"| recall@1, {2 * len(paraphrase_pairs())} sentences each finding its pair | {recall:.3f} | |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=200)
    harness.add_work_arguments(parser)
    args = parser.parse_args()
    return harness.print_report(args, "bench-embeddings-", lambda work, env: report(work, env, args))


if __name__ == "__main__":
    raise SystemExit(main())
