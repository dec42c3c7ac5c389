"""Human-readable reports for eval runs, and a leaderboard across them.

An eval run leaves one machine-readable `results.json`; this module turns it into the files
people actually open: Markdown for a PR or a terminal, CSV for spreadsheets, a PNG chart, and
one self-contained HTML page (images inlined as data URIs) that can be mailed or attached to a
ticket without the run directory. Every view is rendered from the same rows, so the Markdown and
HTML tables never disagree.

Only the stdlib and matplotlib are used; matplotlib is imported inside the plotting functions
(Agg canvas, no pyplot) so that importing this module stays cheap and works headless and inside
Ray workers, where pyplot's global state and GUI backends are a liability.
"""
from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

RESULTS = "results.json"
NEEDLE_HEATMAP = Path("needle") / "heatmap.png"
SUMMARY_HEADERS = ["dataset", "metric", "score", "n", "contamination rate", "failed tasks"]
LOWER_IS_BETTER = {"perplexity"}
CSV_FIELDS = ["run_id", "model", "backend", "dataset", "metric", "score", "n", "contamination_rate", "failed_tasks"]
MISSING = "-"

Table = tuple[list[str], list[list[str]]]  # headers, rows of already formatted cells


def write_report(run_dir: Path) -> dict[str, Path]:
    """Write report.md, report.csv, scores.png and report.html next to `run_dir/results.json`."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / RESULTS).read_text(encoding="utf-8"))
    model = results["model"]["name"]
    paths = {"md": run_dir / "report.md", "csv": run_dir / "report.csv",
             "png": run_dir / "scores.png", "html": run_dir / "report.html"}

    summary, categories, notes = _summary(results), _category_tables(results), _notes(results)
    header = [f"Run: {results['run_id']}", f"Created: {results['created']}",
              f"Model: {model} (backend {results['model']['backend']}, {results['model']['path_or_url']})",
              *_timing(results)]

    md = [f"# Eval report: {_md_cell(model)}", "", *(f"- {_md_cell(line)}" for line in header), "",
          "## Summary", "", _md_table(*summary), ""]
    md += [f"- {_md_cell(note)}" for note in notes] + ([""] if notes else [])
    for dataset, table in categories:
        md += [f"## {_md_cell(dataset)} by category", "", _md_table(*table), ""]
    paths["md"].write_text("\n".join(md), encoding="utf-8")

    _write_csv(paths["csv"], CSV_FIELDS, _csv_rows(results))

    datasets = results["datasets"]
    _bar_chart({name: d["score"] for name, d in datasets.items()
                if d["score"] is not None and d["metric"] not in LOWER_IS_BETTER},
               paths["png"], title=f"{model}: eval scores")

    body = [f"<h1>Eval report: {html.escape(model)}</h1>",
            "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in header) + "</ul>",
            "<h2>Summary</h2>", _html_table(*summary)]
    if notes:
        body.append("<ul>" + "".join(f"<li>{html.escape(note)}</li>" for note in notes) + "</ul>")
    for dataset, table in categories:
        body += [f"<h2>{html.escape(dataset)} by category</h2>", _html_table(*table)]
    body += ["<h2>Scores</h2>", _html_img(paths["png"], f"{model} scores per dataset")]
    if (run_dir / NEEDLE_HEATMAP).is_file():
        body += ["<h2>Needle in a haystack</h2>", _html_img(run_dir / NEEDLE_HEATMAP, "needle heatmap")]
    paths["html"].write_text(_html_page(f"Eval report: {model}", body), encoding="utf-8")
    return paths


def leaderboard(root: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Tabulate models x datasets over every `<root>/*/results.json`, newest run per cell.

    Re-running one benchmark for a model should replace only that cell, so "latest" is decided
    per (model, dataset) by the run's `created` time, not per run. Directories without a
    results.json (other stages, unfinished evals) are skipped. In the CSV a missing cell is empty
    and scores are raw numbers, so it loads as numbers; Markdown and HTML show "-", percent and perplexity.
    """
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    best: dict[tuple[str, str], tuple[dt.datetime, str, float | None, str]] = {}
    for path in sorted(root.glob(f"*/{RESULTS}")):
        results = json.loads(path.read_text(encoding="utf-8"))
        created = dt.datetime.fromisoformat(results["created"])
        for dataset, d in results["datasets"].items():
            key = (results["model"]["name"], dataset)
            candidate = (created, results["run_id"], d["score"], d["metric"])
            if key not in best or candidate[:2] > best[key][:2]:
                best[key] = candidate

    models = sorted({m for m, _ in best})
    datasets = sorted({d for _, d in best})
    scores = {key: score for key, (_, _, score, _) in best.items()}
    shown = (["model", *datasets], [[m, *(_score(best[(m, d)][3], scores[(m, d)]) if (m, d) in scores else MISSING
                                          for d in datasets)] for m in models])

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "leaderboard.md", "csv": out_dir / "leaderboard.csv", "html": out_dir / "leaderboard.html"}
    paths["md"].write_text(f"# Leaderboard\n\n{_md_table(*shown)}\n", encoding="utf-8")
    _write_csv(paths["csv"], ["model", *datasets],
               [{"model": m, **{d: _raw(scores.get((m, d))) for d in datasets}} for m in models])
    paths["html"].write_text(_html_page("Leaderboard", ["<h1>Leaderboard</h1>", _html_table(*shown)]), encoding="utf-8")
    return paths


def needle_heatmap(scores: dict[tuple[int, float], float], out: Path, title: str) -> Path:
    """Plot needle-in-a-haystack scores: context length (x) by needle depth (y, 0% = start).

    Retrieval failures cluster in bands of depth or beyond some length; a grid with each cell
    annotated shows both at a glance. Cells that were not measured stay blank rather than 0.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths = sorted({length for length, _ in scores})
    depths = sorted({depth for _, depth in scores})
    grid = [[scores.get((length, depth), float("nan")) for length in lengths] for depth in depths]

    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(lengths)), max(3.0, 1.0 + 0.5 * len(depths))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for row, depth in enumerate(depths):
        for col, length in enumerate(lengths):
            if (length, depth) in scores:
                ax.text(col, row, f"{scores[(length, depth)]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * depth:.0f}%" for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="score")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# --- rows shared by the Markdown, CSV and HTML views ---

def _summary(results: dict[str, Any]) -> Table:
    rows = [[name, d["metric"], _score(d["metric"], d["score"]), str(d["n"]), _pct(_contamination_rate(d)),
             str(len(d["failed_tasks"]))]
            for name, d in results["datasets"].items()]
    return SUMMARY_HEADERS, rows


def _category_tables(results: dict[str, Any]) -> list[tuple[str, Table]]:
    """Per-category breakdowns, best first, so the weakest categories end up at the bottom."""
    tables = []
    for name, d in results["datasets"].items():
        if not d.get("per_category"):
            continue
        sign = 1 if d["metric"] in LOWER_IS_BETTER else -1
        ranked = sorted(d["per_category"].items(), key=lambda item: (sign * item[1]["score"], item[0]))
        tables.append((name, (["category", "score", "n"],
                              [[c, _score(d["metric"], v["score"]), str(v["n"])] for c, v in ranked])))
    return tables


def _notes(results: dict[str, Any]) -> list[str]:
    """What the summary table's counts hide: how contamination was measured, which tasks failed."""
    notes = []
    for name, d in results["datasets"].items():
        c = d.get("contamination") or {}
        if "contaminated_items" in c:
            notes.append(f"{name} contamination: {c['method']}; {c['contaminated_items']} items flagged "
                         f"(threshold {c['threshold']})")
        if order := c.get("order_test"):
            notes.append(f"{name} {order['method']}: published order likeliest for {order['rate']:.1%} of "
                         f"{order['items']} items (chance {order['chance_rate']:.1%}, p = {order['p_value']:.2g})")
        if "bits_per_byte" in d:
            notes.append(f"{name}: {d['tokens']} tokens scored, {d['bits_per_byte']:.4f} bits per byte")
        if d["failed_tasks"]:
            notes.append(f"{name} failed tasks: {', '.join(d['failed_tasks'])}")
    return notes


def _csv_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    model = results["model"]
    return [{"run_id": results["run_id"], "model": model["name"], "backend": model["backend"], "dataset": name,
             "metric": d["metric"], "score": _raw(d["score"]), "n": str(d["n"]),
             "contamination_rate": _raw(_contamination_rate(d)), "failed_tasks": ";".join(d["failed_tasks"])}
            for name, d in results["datasets"].items()]


def _timing(results: dict[str, Any]) -> list[str]:
    timing = results.get("timing") or {}
    if "wall_s" not in timing:
        return []
    rate = f", {timing['samples_per_s']:.1f} samples/s" if timing.get("samples_per_s") is not None else ""
    return [f"Time: {timing['wall_s']:.1f} s wall{rate}"]


def _contamination_rate(d: dict[str, Any]) -> float | None:
    return (d.get("contamination") or {}).get("rate")


def _score(metric: str, x: float | None) -> str:
    """Fractions (accuracy, pass@k...) in percent; perplexity as the number it is."""
    return f"{x:.3f}" if metric in LOWER_IS_BETTER and x is not None else _pct(x)


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.1f}%"


def _raw(x: float | None) -> str:
    return "" if x is None else repr(x)


# --- renderers ---

def _md_cell(text: str) -> str:
    """Pipes and newlines would break a Markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _write_csv(path: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_img(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _html_page(title: str, body: list[str]) -> str:
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.3em .6em}"
             "td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _bar_chart(scores: dict[str, float], out: Path, title: str) -> None:
    """Horizontal bars in percent on a fixed 0-100 axis, so charts of different runs compare."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(scores)
    values = [100 * scores[name] for name in names]
    fig = Figure(figsize=(6.0, 1.0 + 0.45 * max(1, len(names))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.barh(names, values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()  # first dataset on top, in the same order as the summary table
    ax.set_xlim(0, 110)  # headroom for the labels of bars near 100%
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("score (%)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
