"""Eval reports and the leaderboard, from hand-written results.json files in tmp_path (no Ray, no model)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from internray.eval.report import leaderboard, needle_heatmap, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_TAG = '<img src="data:image/png;base64,'
ODD_NAME = 'tiny<llama> & "co"'  # must come out escaped in HTML


def dataset(metric: str, score: float, n: int, *, failed=(), per_category=None, contamination=None) -> dict:
    return {"metric": metric, "score": score, "n": n, "failed_tasks": list(failed),
            "per_category": per_category or {}, "contamination": contamination}


def make_run(root: Path, dirname: str, model: str, created: str, datasets: dict) -> Path:
    run_dir = root / dirname
    run_dir.mkdir(parents=True)
    results = {"run_id": dirname, "created": created,
               "model": {"name": model, "backend": "hf", "path_or_url": f"/models/{model}"},
               "datasets": datasets, "timing": {"wall_s": 12.3, "samples_per_s": 16.2}}
    (run_dir / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    """Two models; smollm has an older and a newer run. Directory names sort opposite to the
    creation times on purpose, so only `created` can pick the newer run."""
    root = tmp_path / "runs"
    newer = make_run(root, "eval-a", "smollm2-135m", "2026-11-30T15:30:00Z", {
        "mmlu": dataset("accuracy", 0.25, 200,
                        per_category={"astronomy": {"score": 0.3, "n": 10}, "anatomy": {"score": 0.1, "n": 10},
                                      "biology": {"score": 0.6, "n": 10}},
                        contamination={"method": "13-gram overlap with data run data-x", "rate": 0.02,
                                       "contaminated_items": 4, "threshold": 0.5}),
        "humaneval": dataset("pass@1", 0.0, 164, failed=["humaneval/3"]),
    })
    older = make_run(root, "eval-b", "smollm2-135m", "2026-11-29T09:00:00Z", {
        "mmlu": dataset("accuracy", 0.125, 200),
        "gsm8k": dataset("accuracy", 0.4, 50),
    })
    other = make_run(root, "eval-c", ODD_NAME, "2026-11-30T16:00:00Z", {"mmlu": dataset("accuracy", 0.5, 200)})
    (root / "data-20261130-000000-000000").mkdir()  # another stage's run: no results.json, skipped
    return {"root": root, "newer": newer, "older": older, "other": other}


def test_write_report_writes_all_four_files(runs):
    paths = write_report(runs["newer"])
    assert set(paths) == {"md", "csv", "png", "html"}
    assert all(p.is_file() and p.parent == runs["newer"] for p in paths.values())
    assert paths["png"].read_bytes().startswith(PNG_SIGNATURE)


def test_markdown_has_percent_scores_and_categories_best_first(runs):
    md = write_report(runs["newer"])["md"].read_text()
    assert "| mmlu | accuracy | 25.0% | 200 | 2.0% | 0 |" in md
    assert "| humaneval | pass@1 | 0.0% | 164 | - | 1 |" in md
    assert "humaneval/3" in md and "13-gram overlap" in md
    rows = ["| biology | 60.0% | 10 |", "| astronomy | 30.0% | 10 |", "| anatomy | 10.0% | 10 |"]
    assert [md.index(row) for row in rows] == sorted(md.index(row) for row in rows)
    assert "humaneval by category" not in md  # no per_category, no table


def test_csv_has_one_row_per_dataset(runs):
    with write_report(runs["newer"])["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    common = {"run_id": "eval-a", "model": "smollm2-135m", "backend": "hf"}
    assert rows == [
        {**common, "dataset": "mmlu", "metric": "accuracy", "score": "0.25", "n": "200",
         "contamination_rate": "0.02", "failed_tasks": ""},
        {**common, "dataset": "humaneval", "metric": "pass@1", "score": "0.0", "n": "164",
         "contamination_rate": "", "failed_tasks": "humaneval/3"},
    ]


def test_html_is_escaped_and_self_contained(runs):
    page = write_report(runs["other"])["html"].read_text()
    assert "tiny&lt;llama&gt; &amp; &quot;co&quot;" in page and ODD_NAME not in page
    assert "eval-c" in page and "50.0%" in page
    assert page.count(IMG_TAG) == 1


def test_html_embeds_the_needle_heatmap_when_present(runs):
    needle_heatmap({(1024, 0.0): 1.0, (1024, 0.5): 0.5, (2048, 0.0): 0.0},
                   runs["newer"] / "needle" / "heatmap.png", title="needle")
    page = write_report(runs["newer"])["html"].read_text()
    assert page.count(IMG_TAG) == 2 and "Needle in a haystack" in page


def test_leaderboard_keeps_the_latest_run_per_model_and_dataset(runs, tmp_path):
    paths = leaderboard(runs["root"], out_dir=tmp_path / "board")
    assert set(paths) == {"md", "csv", "html"}
    assert all(p.is_file() and p.parent == tmp_path / "board" for p in paths.values())

    md = paths["md"].read_text()
    assert "| model | gsm8k | humaneval | mmlu |" in md
    # mmlu from the newer run (25.0%, not 12.5%), gsm8k only exists in the older one
    assert "| smollm2-135m | 40.0% | 0.0% | 25.0% |" in md and "12.5%" not in md
    assert "| tiny<llama> & \"co\" | - | - | 50.0% |" in md

    with paths["csv"].open(newline="") as f:
        rows = {row["model"]: row for row in csv.DictReader(f)}
    assert rows["smollm2-135m"] == {"model": "smollm2-135m", "gsm8k": "0.4", "humaneval": "0.0", "mmlu": "0.25"}
    assert rows[ODD_NAME]["humaneval"] == ""

    page = paths["html"].read_text()
    assert "tiny&lt;llama&gt;" in page and "<td>-</td>" in page


def test_leaderboard_defaults_to_the_root(runs):
    assert leaderboard(runs["root"])["md"] == runs["root"] / "leaderboard.md"


def test_needle_heatmap_writes_a_png(tmp_path):
    scores = {(length, depth): 1.0 - depth * length / 8192
              for length in (1024, 2048, 4096) for depth in (0.0, 0.5, 1.0)}
    out = needle_heatmap(scores, tmp_path / "sub" / "heatmap.png", title="needle in a haystack")
    assert out == tmp_path / "sub" / "heatmap.png"
    assert out.read_bytes().startswith(PNG_SIGNATURE)
