"""Draw the PNG charts of ``docs/benchmarks.md`` from the figures in ``docs/figures.json``.

Every number in ``docs/figures.json`` is copied from ``docs/benchmarks.md``, with the command that
produced it; this script refuses to draw while one of them is missing from the page. After rerunning a
benchmark, update its table and its numbers in the json, then redraw.

Usage::

    python -m scripts.charts            # docs/figures.json -> docs/charts/*.png
    python -m scripts.charts --check    # only check the json's numbers against docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

DOCS = Path(__file__).resolve().parent.parent / "docs"
DPI = 100
ANCHOR_COLOR = "dimgray"
TARGET_COLOR = "tab:red"
MODE_COLORS = ("tab:blue", "tab:orange")
TARGETED_COLOR = "tab:blue"
BUILD_COLOR = "silver"
SERVER_STYLE: dict[str, Any] = {"marker": "*", "markersize": 15, "zorder": 3}
OTHER_STYLE: dict[str, Any] = {"marker": "o", "markersize": 7, "zorder": 4}
# a number as the page writes it: 1,164 or 0.998 (thousands separators dropped)
NUMBER = re.compile(r"(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")

Figures = dict[str, Any]


# -- the numbers ------------------------------------------------------------------------------------
def json_numbers(value: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a json value, with its path (``core.metrics[0].ratio``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_numbers(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_numbers(item, f"{path}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def page_numbers(text: str) -> set[float]:
    """Every number written in a markdown page."""
    return {float(match.replace(",", "")) for match in NUMBER.findall(text)}


def missing_numbers(figures: Figures, page: str) -> list[str]:
    """The json's numbers (``path = value``) that the page does not contain."""
    known = page_numbers(page)
    return [f"{path} = {value:g}" for path, value in json_numbers(figures) if value not in known]


# -- drawing helpers --------------------------------------------------------------------------------
def new_figure(width: float, height: float, columns: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure on the Agg canvas with ``columns`` axes side by side."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, list(figure.subplots(1, columns, squeeze=False)[0])


def footer(figure: Figure, lines: list[str], height: float = 0.07, top: float = 1.0) -> None:
    """The source of the figures under the axes, which keep the band from ``height`` to ``top``."""
    figure.text(0.01, 0.01, "\n".join(lines), fontsize=7, color="dimgray", va="bottom")
    figure.tight_layout(rect=(0, height, 1, top))


def reference_line(axes: Axes, value: float, label: str, color: str, vertical: bool = False) -> Line2D:
    """A dashed line across the axes at ``value`` (an anchor or a target)."""
    draw = axes.axvline if vertical else axes.axhline
    return draw(value, color=color, linestyle="--", linewidth=1.2, label=label, zorder=1)


def label_bars(axes: Axes, bars: BarContainer, texts: list[str], padding: float = 2) -> None:
    """A label on the end of each bar."""
    axes.bar_label(bars, labels=texts, padding=padding, fontsize=8)


# -- the charts -------------------------------------------------------------------------------------
def core_ratios(figures: Figures) -> Figure:
    """Ingest and DoGet as ratios to their in-process anchors, with each metric's target."""
    core = figures["core"]
    metrics = core["metrics"]
    figure, (axes,) = new_figure(7.5, 4.2)
    ticks = [f"{m['name']}\n{m['server']:g} vs {m['anchor']:g} {m['unit']}" for m in metrics]
    x = range(len(metrics))
    bars = axes.bar(x, [m["ratio"] for m in metrics], width=0.55, color="tab:blue", label="server", zorder=2)
    ratios = [f"{m['ratio']:.2f}x" for m in metrics]
    axes.bar_label(bars, ratios, label_type="center", color="white", fontsize=11)
    for index, metric in enumerate(metrics):
        axes.hlines(metric["target"], index - 0.36, index + 0.36, color=TARGET_COLOR, linewidth=2.5, zorder=3)
    axes.plot([], [], color=TARGET_COLOR, linewidth=2.5, label="target (>=)")
    reference_line(axes, 1.0, "in-process anchor = 1.0", ANCHOR_COLOR)
    axes.set_xticks(list(x), ticks, fontsize=8)
    axes.set_ylim(0, 1.3)
    axes.set_ylabel("server / in-process anchor (x, higher is better)")
    axes.set_title("Core: DoPut ingest and DoGet, server vs in-process (5,000,000 rows)", fontsize=10)
    axes.legend(loc="upper center", ncols=3, fontsize=8)
    footer(figure, [f"{core['command']}, {core['when']}; {core['setup']}", f"ratio = {core['ratio']}"])
    return figure


def grouped_bars(axes: Axes, section: Figures, field: str, fmt: str) -> list[BarContainer]:
    """One group per index kind, one bar per serving mode, of ``field``; returns the bars per mode."""
    modes = section["modes"]
    kinds = list(modes[0]["kinds"])
    width = 0.8 / len(modes)
    containers = []
    for offset, (mode, color) in enumerate(zip(modes, MODE_COLORS, strict=False)):
        x = [k + (offset - (len(modes) - 1) / 2) * width for k in range(len(kinds))]
        values = [mode["kinds"][kind][field] for kind in kinds]
        bars = axes.bar(x, values, width=width, color=color, label=mode["name"], zorder=2)
        label_bars(axes, bars, [format(value, fmt) for value in values])
        containers.append(bars)
    axes.set_xticks(range(len(kinds)), kinds)
    return containers


def vector_serving(figures: Figures) -> Figure:
    """Search throughput ratio and p99 at 10 clients, from memory and from Lance."""
    section = figures["vector_serving"]
    target_ratio, target_p99 = section["target_ratio"], section["target_p99_ms"]
    figure, (ratio_axes, p99_axes) = new_figure(8.5, 4.8, columns=2)
    modes = grouped_bars(ratio_axes, section, "ratio", ".2f")
    ratio_lines = [
        reference_line(ratio_axes, 1.0, "lancedb in-process = 1.0", ANCHOR_COLOR),
        reference_line(ratio_axes, target_ratio, f"target >= {target_ratio:g}x", TARGET_COLOR),
    ]
    ratio_axes.legend(handles=ratio_lines, fontsize=7, loc="upper right")
    ratio_axes.set_ylabel("server q/s / lancedb in-process q/s (x)")
    ratio_axes.set_title("Throughput at 10 clients (higher is better)", fontsize=10)
    ratio_axes.set_ylim(0, 5.5)
    grouped_bars(p99_axes, section, "p99_ms", ".1f")
    p99_line = reference_line(p99_axes, target_p99, f"target <= {target_p99:g} ms", TARGET_COLOR)
    p99_axes.legend(handles=[p99_line], fontsize=7, loc="upper right")
    p99_axes.set_ylabel("p99 latency (ms)")
    p99_axes.set_title("p99 latency at 10 clients (lower is better)", fontsize=10)
    p99_axes.set_ylim(0, 80)
    figure.suptitle("Vector search by serving mode (100,000 x 384, k = 10)", fontsize=11, y=0.99)
    figure.legend(handles=modes, loc="upper center", bbox_to_anchor=(0.5, 0.95), ncols=2, fontsize=8)
    footer(figure, [f"{mode['command']}, {mode['when']}" for mode in section["modes"]], top=0.95)
    return figure


def rss_label(phase: Figures) -> str:
    """The page's text for a phase's RSS: 340, 407-435 (over rounds), or 562 (589) (median, worst)."""
    if "upto" not in phase:
        return f"{phase['mb']}"
    return f"{phase['mb']}-{phase['upto']}" if phase["target"] else f"{phase['mb']} ({phase['upto']})"


def vector_rss(figures: Figures) -> Figure:
    """The server's RSS phase by phase over the vector benchmark, against the 500 MB target."""
    section = figures["vector_rss"]
    phases = section["phases"]
    target = section["target_below_mb"]
    figure, (axes,) = new_figure(8.0, 4.4)
    y = list(range(len(phases)))
    colors = [TARGETED_COLOR if phase["target"] else BUILD_COLOR for phase in phases]
    bars = axes.barh(y, [phase["mb"] for phase in phases], height=0.6, color=colors, zorder=2)
    for index, phase in enumerate(phases):
        if "upto" in phase:
            up = phase["upto"] - phase["mb"]
            axes.errorbar(phase["mb"], index, xerr=[[0], [up]], color="black", capsize=3, zorder=3)
    label_bars(axes, bars, [rss_label(phase) for phase in phases], padding=18)
    handles = [
        Patch(color=TARGETED_COLOR, label="loading and searching"),
        Patch(color=BUILD_COLOR, label="index or in-memory copy build (no target)"),
        reference_line(axes, target, f"target < {target} MB", TARGET_COLOR, vertical=True),
    ]
    axes.legend(handles=handles, fontsize=7, loc="lower right")
    axes.set_yticks(y, [phase["name"] for phase in phases], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, 900)
    axes.set_xlabel("server RSS (MB)")
    axes.set_title("Vector benchmark: server RSS by phase (100,000 x 384)", fontsize=10)
    footer(figure, [f"{section['command']}, {section['when']}", section["setup"]])
    return figure


def ann_point(latency_axes: Axes, qps_axes: Axes, config: Figures, color: str) -> None:
    """One configuration: p50 to p99 at its recall on the left, batch QPS on the right."""
    server = "the server" in config["name"]
    # the server's star under the others' dots: faiss HNSWFlat sits 0.011 ms from it
    style = SERVER_STYLE if server else OTHER_STYLE
    recall = config["recall"]
    latency_axes.plot([config["p50_ms"], config["p99_ms"]], [recall] * 2, color=color, linewidth=1, zorder=2)
    latency_axes.plot(config["p50_ms"], recall, color=color, **style)
    latency_axes.plot(config["p99_ms"], recall, "o", mfc="white", color=color, markersize=6, zorder=4)
    qps_axes.plot(config["batch_qps"], recall, color=color, label=config["name"], linestyle="", **style)


def ann_libraries(figures: Figures) -> Figure:
    """Recall@10 against single-query latency and against batch QPS, per ANN configuration."""
    section = figures["ann_libraries"]
    figure, (latency_axes, qps_axes) = new_figure(8.5, 5.0, columns=2)
    for index, config in enumerate(section["configurations"]):
        ann_point(latency_axes, qps_axes, config, f"C{index}")
    latency_axes.set_xlabel("single-query latency (ms): filled p50, hollow p99")
    latency_axes.set_title("Recall vs latency (up and left is better)", fontsize=10)
    qps_axes.set_xlabel("batch throughput (queries/s)")
    qps_axes.set_title("Recall vs batch QPS (up and right is better)", fontsize=10)
    for axes in (latency_axes, qps_axes):
        axes.set_ylabel("recall@10")
        axes.grid(alpha=0.3)
    figure.suptitle("ANN libraries in one process: faiss-cpu vs usearch (100,000 x 384)", fontsize=11)
    handles, labels = qps_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 0.075), ncols=3, fontsize=7)
    footer(figure, [f"{section['command']}, {section['when']}", section["setup"]], height=0.17)
    return figure


def tpch_queries(axes: Axes, section: Figures) -> None:
    """Per query, the server's time over DuckDB in-process's, through DoGet and through ADBC."""
    queries = section["queries"]
    highest = 1.0
    for offset, (key, color) in enumerate(zip(("doget", "adbc"), MODE_COLORS, strict=True)):
        x = [index + (offset - 0.5) * 0.4 for index in range(len(queries))]
        ratios = [query["ratio"].get(key, 0) for query in queries]
        axes.bar(x, ratios, width=0.4, color=color, label=f"server, {section['engines'][key]}", zorder=2)
        highest = max(highest, *ratios)
    reference_line(axes, 1.0, "DuckDB in-process = 1.0", ANCHOR_COLOR)
    target = section["target_ratio"]
    reference_line(axes, target, f"target for the total: <= {target:g}x", TARGET_COLOR)
    axes.set_xticks(range(len(queries)), [f"Q{query['query']}" for query in queries], fontsize=7)
    axes.set_ylim(0, highest * 1.3)
    axes.set_ylabel("time through the server / DuckDB in-process (x)")
    axes.set_title("Per query (lower is better)", fontsize=10)
    axes.legend(fontsize=7, loc="upper center", ncols=4)


def tpch_totals(axes: Axes, section: Figures) -> None:
    """Sums of the per-query medians: each engine next to DuckDB in-process over the same queries."""
    totals = section["totals"]
    duckdb = totals["doget"]["duckdb_seconds"]
    keys = ["doget", "adbc", "duckdb", *(key for key in totals if key not in ("doget", "adbc"))]
    seconds = [duckdb if key == "duckdb" else totals[key]["seconds"] for key in keys]
    texts = [
        f"{duckdb:.3f} s" if k == "duckdb" else f"{totals[k]['seconds']:.3f} s ({totals[k]['ratio']:.2f}x)"
        for k in keys
    ]
    colors = {"doget": MODE_COLORS[0], "adbc": MODE_COLORS[1], "duckdb": ANCHOR_COLOR}
    y = list(range(len(keys)))
    bars = axes.barh(y, seconds, height=0.6, color=[colors.get(k, "tab:green") for k in keys], zorder=2)
    for text in axes.bar_label(bars, labels=texts, padding=2, fontsize=8):
        text.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 1})
    target = section["target_ratio"]
    reference_line(axes, target * duckdb, f"target: DoGet <= {target:g}x", TARGET_COLOR, vertical=True)
    names = [
        section["engines"][k]
        if k == "duckdb"
        else f"{section['engines'][k]}\n({totals[k]['queries']} queries)"
        for k in keys
    ]
    axes.set_yticks(y, names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlim(duckdb / 3, max(seconds) * 8)
    axes.set_xlabel("sum of the per-query medians (s, log scale)")
    axes.set_title("Total (lower is better)", fontsize=10)
    axes.legend(fontsize=7, loc="upper right")


def tpch(figures: Figures) -> Figure:
    """TPC-H: the 22 queries through the server next to DuckDB in-process, and the totals with ROAPI's."""
    section = figures["tpch"]
    figure = Figure(figsize=(12.0, 4.8), dpi=DPI)
    FigureCanvasAgg(figure)
    query_axes, total_axes = figure.subplots(1, 2, width_ratios=(2.2, 1))
    tpch_queries(query_axes, section)
    tpch_totals(total_axes, section)
    figure.suptitle(f"TPC-H SF{section['scale']:g} through the server vs DuckDB in-process", fontsize=11)
    ratio = "ratio = time / DuckDB in-process time, same Parquet files; totals over the queries each answered"
    footer(figure, [f"{section['command']}, {section['when']}; {section['setup']}", ratio], height=0.09)
    return figure


CHARTS: dict[str, Callable[[Figures], Figure]] = {
    "core_ratios": core_ratios,
    "vector_serving": vector_serving,
    "vector_rss": vector_rss,
    "ann_libraries": ann_libraries,
    "tpch": tpch,
}


# -- command line -----------------------------------------------------------------------------------
def draw_all(figures: Figures, out: Path) -> list[Path]:
    """Write every chart as ``out/<name>.png``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, chart in CHARTS.items():
        path = out / f"{name}.png"
        # no Software/date metadata: an unchanged chart redraws to the same bytes
        chart(figures).savefig(path, dpi=DPI, metadata={"Software": None})
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: where the figures, the page and the charts are."""
    parser = argparse.ArgumentParser(description="Draw docs/charts/*.png from docs/figures.json.")
    parser.add_argument("--figures", type=Path, default=DOCS / "figures.json", help="the figures (json)")
    parser.add_argument("--page", type=Path, default=DOCS / "benchmarks.md", help="the page they come from")
    parser.add_argument("--out", type=Path, default=DOCS / "charts", help="where the PNGs go")
    parser.add_argument("--check", action="store_true", help="only check the numbers against the page")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: check the figures against the page, then draw the charts."""
    args = parse_args(argv)
    figures = json.loads(args.figures.read_text())
    missing = missing_numbers(figures, args.page.read_text())
    for line in missing:
        print(f"{args.figures}: {line} is not in {args.page}", file=sys.stderr)
    if missing or args.check:
        return 1 if missing else 0
    for path in draw_all(figures, args.out):
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
