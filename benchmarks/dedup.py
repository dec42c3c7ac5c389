"""Fuzzy-dedup benchmark: internray's MinHash-LSH on Ray against datasketch, on real documents.

Target (the project's): F1 at least datasketch's, throughput at least 2x datasketch's on this 2-core
machine, and a note on how throughput grows with workers.

Corpus: the running interpreter's standard-library sources (*.py, not under tests/ or site-packages,
500..50,000 characters), shuffled with --seed and capped at --docs originals. For a random 10% of
them one mutated copy per word edit rate in EDIT_RATES is appended (random words replaced, deleted
or inserted); copies come after all originals, so a copy is the one a dedup must drop. CPython 3.11's
stdlib has ~1,350 such files, so larger --docs are capped; --root points at another source tree
(e.g. the venv's site-packages, tens of thousands of real files).

Ground truth is exact Jaccard over the shingle sets both systems see (MinHasher.shingles, word
5-grams). Systems, with the same num_perm, bands x rows and threshold:
- internray: `fuzzy_duplicates` (verify=True, partitions=2*W) on the corpus read from Parquet, in a
  fresh subprocess per worker count W (Ray starts once per process; connect(num_cpus=W) gives Ray
  Data at most W parallel tasks). Timed after ray.init and a small warm-up run that starts workers.
- datasketch: MinHash.update_batch over the same shingles as bytes, then MinHashLSH(params=(b, r)),
  querying each document before inserting it; a document with any hit is flagged. One process.
Both timings include shingling.

Run:  .venv/bin/python benchmarks/dedup.py --docs 6000 [--workers 1,2] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `internray` from this checkout
from internray.data.minhash import MinHasher  # noqa: E402

EDIT_RATES = (0.01, 0.03, 0.05, 0.10, 0.20)
PLANT_FRACTION = 0.10
CORPUS_FILES = 16  # the corpus is several Parquet files, as a pipeline stage writes it
DEFINITIONS = """\
flagged    a document the system would drop as a near-duplicate of an earlier one
precision  flagged documents whose exact shingle Jaccard with the document they were matched to is
           >= threshold (internray: kept_id; datasketch: any earlier LSH hit), / flagged documents
recall     planted copies whose exact Jaccard with their original is >= threshold that are flagged,
           / such copies (natural duplicates in the corpus count for precision only)
F1         2 * precision * recall / (precision + recall)"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, default=6000, help="cap on original documents (before copies)")
    p.add_argument("--root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--workers", default="1,2", help="internray worker counts, comma separated")
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--bands", type=int, default=16)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--only", choices=["internray"], help=argparse.SUPPRESS)  # child-process mode
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    return p.parse_args()


# ---- corpus and ground truth -------------------------------------------------------------------
def load_originals(root: Path, limit: int, seed: int) -> list[tuple[str, str]]:
    files = sorted(p for p in root.rglob("*.py") if not {"tests", "site-packages"} & set(p.relative_to(root).parts))
    docs = [(str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")) for p in files]
    docs = [(name, text) for name, text in docs if 500 <= len(text) <= 50_000]
    random.Random(seed).shuffle(docs)
    return docs[:limit]


def mutate(text: str, rate: float, rng: random.Random) -> str:
    """Edit round(rate * words) random words: replace with / insert another word of the text, or delete."""
    tokens = re.split(r"(\s+)", text)  # words at even indices, whitespace runs at odd ones
    positions = [i for i in range(0, len(tokens), 2) if tokens[i]]
    vocab = [tokens[i] for i in positions]
    for i in rng.sample(positions, max(1, round(rate * len(positions)))):
        op = rng.choice(("replace", "delete", "insert"))
        tokens[i] = {"replace": rng.choice(vocab), "delete": "", "insert": f"{tokens[i]} {rng.choice(vocab)}"}[op]
    return "".join(tokens)


def build_corpus(args) -> tuple[list[dict], list[tuple[int, int, float]]]:
    """Documents (id, seq, text) and the planted (copy seq, original seq, edit rate) triples."""
    rng = random.Random(args.seed)
    docs = [{"id": name, "text": text} for name, text in load_originals(args.root, args.docs, args.seed)]
    picked = sorted(rng.sample(range(len(docs)), round(PLANT_FRACTION * len(docs))))
    copies = [(orig, rate, mutate(docs[orig]["text"], rate, rng)) for orig in picked for rate in EDIT_RATES]
    rng.shuffle(copies)
    planted = []
    for orig, rate, text in copies:
        planted.append((len(docs), orig, rate))
        docs.append({"id": f"{docs[orig]['id']}~edit{rate:.0%}", "text": text})
    for seq, doc in enumerate(docs):
        doc["seq"] = seq
    return docs, planted


def score(flagged: dict[int, list[int]], planted, jaccard, threshold: float) -> dict:
    """flagged: doc seq -> the seqs it was matched to; true positive if any is >= threshold."""
    tp = sum(any(jaccard(d, m) >= threshold for m in matches) for d, matches in flagged.items())
    true_copies = [c for c, o, _ in planted if jaccard(c, o) >= threshold]
    found = sum(c in flagged for c in true_copies)
    precision = tp / len(flagged) if flagged else 1.0
    recall = found / len(true_copies) if true_copies else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"flagged": len(flagged), "true_positives": tp, "precision": precision, "recall": recall, "f1": f1}


# ---- the two systems ---------------------------------------------------------------------------
def run_datasketch(docs: list[dict], args) -> tuple[float, dict[int, list[int]]]:
    from datasketch import MinHash, MinHashLSH

    hasher = MinHasher(args.num_perm, args.bands, args.rows, "word", 5, args.seed)  # for shingles only
    start = time.perf_counter()
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm, params=(args.bands, args.rows))
    flagged = {}
    for doc in docs:
        m = MinHash(num_perm=args.num_perm, seed=args.seed)
        m.update_batch([s.encode("utf-8") for s in hasher.shingles(doc["text"])])
        hits = lsh.query(m)
        if hits:
            flagged[doc["seq"]] = sorted(hits)  # earliest-inserted first
        lsh.insert(doc["seq"], m)
    return time.perf_counter() - start, flagged


def internray_child(args) -> None:
    """Child process: one worker count; prints one JSON line with the time and the (id, kept_id) pairs."""
    import ray

    from internray.data.config import FuzzyDedupSection
    from internray.data.dedup import fuzzy_duplicates
    from internray.runtime import connect

    workers = int(args.workers)
    connect(num_cpus=workers)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = FuzzyDedupSection(num_perm=args.num_perm, bands=args.bands, rows=args.rows, threshold=args.threshold,
                            verify=True, seed=args.seed, partitions=2 * workers)
    work = Path(args.corpus).parent / f"work-w{workers}"
    start = time.perf_counter()
    fuzzy_duplicates(ray.data.read_parquet(args.corpus).limit(100), work / "warmup", cfg)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    docs = ray.data.read_parquet(args.corpus)
    out = fuzzy_duplicates(docs, work / "timed", cfg)
    dups = pq.read_table(out)
    seconds = time.perf_counter() - start
    pairs = list(zip(dups.column("id").to_pylist(), dups.column("kept_id").to_pylist()))
    print(json.dumps({"workers": workers, "seconds": seconds, "warmup_seconds": warmup, "pairs": pairs}))


def run_internray(corpus_dir: Path, workers: int, args) -> dict:
    cmd = [sys.executable, __file__, "--only", "internray", "--workers", str(workers), "--corpus", str(corpus_dir),
           "--num-perm", str(args.num_perm), "--bands", str(args.bands), "--rows", str(args.rows),
           "--threshold", str(args.threshold), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        sys.exit(f"internray W={workers} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ---- main: build, run, score, report -----------------------------------------------------------
def main() -> None:
    args = parse_args()
    if args.only:
        return internray_child(args)
    docs, planted = build_corpus(args)
    originals = len(docs) - len(planted)
    print(f"corpus: {originals} originals from {args.root} (requested --docs {args.docs}) + {len(planted)} planted "
          f"copies of {len(planted) // len(EDIT_RATES)} originals at edit rates {', '.join(f'{r:.0%}' for r in EDIT_RATES)}"
          f" = {len(docs)} documents, {sum(len(d['text']) for d in docs) / 1e6:.1f}M characters")
    print(f"params: num_perm={args.num_perm} bands={args.bands} rows={args.rows} threshold={args.threshold}; "
          f"internray input: {CORPUS_FILES} Parquet files\n")
    hasher = MinHasher(args.num_perm, args.bands, args.rows, "word", 5, args.seed)
    shingle_sets = [set(hasher.shingles(d["text"])) for d in docs]

    def jaccard(a: int, b: int) -> float:
        return len(shingle_sets[a] & shingle_sets[b]) / len(shingle_sets[a] | shingle_sets[b])

    results = {}
    seconds, flagged = run_datasketch(docs, args)
    results["datasketch"] = {"seconds": seconds, "matches": flagged}
    seq_of = {d["id"]: d["seq"] for d in docs}
    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp:
        corpus_dir = Path(tmp) / "corpus"
        corpus_dir.mkdir()
        table = pa.Table.from_pylist(docs, schema=pa.schema([("id", pa.string()), ("seq", pa.int64()), ("text", pa.string())]))
        step = -(-len(docs) // CORPUS_FILES)
        for i in range(0, len(docs), step):
            pq.write_table(table.slice(i, step), corpus_dir / f"part-{i // step:03d}.parquet")
        for w in (int(x) for x in args.workers.split(",")):
            out = run_internray(corpus_dir, w, args)
            results[f"internray W={w}"] = {"seconds": out["seconds"], "warmup_seconds": out["warmup_seconds"],
                                           "matches": {seq_of[a]: [seq_of[b]] for a, b in out["pairs"]}}

    print(DEFINITIONS + "\n")
    print(f"{'system':<16}{'docs':>7}{'seconds':>9}{'docs/s':>9}{'flagged':>9}{'precision':>11}{'recall':>8}{'F1':>7}")
    for name, r in results.items():
        r.update(score(r["matches"], planted, jaccard, args.threshold), docs=len(docs), docs_per_s=len(docs) / r["seconds"])
        print(f"{name:<16}{len(docs):>7}{r['seconds']:>9.2f}{r['docs_per_s']:>9.1f}{r['flagged']:>9}"
              f"{r['precision']:>11.3f}{r['recall']:>8.3f}{r['f1']:>7.3f}")
    warm = ", ".join(f"{k} {r['warmup_seconds']:.1f}s" for k, r in results.items() if "warmup_seconds" in r)
    print(f"(internray times exclude ray.init and a 100-document warm-up run: {warm})\n")

    base, irs = results["datasketch"], [k for k in results if k.startswith("internray")]
    summary = {}
    if irs:
        best = irs[-1]
        summary[f"throughput {best} / datasketch"] = results[best]["docs_per_s"] / base["docs_per_s"]
        summary[f"F1 {best} - datasketch"] = results[best]["f1"] - base["f1"]
        print(f"throughput {best} / datasketch: {summary[f'throughput {best} / datasketch']:.2f}x   (target >= 2x)")
        print(f"F1 {best} - datasketch: {summary[f'F1 {best} - datasketch']:+.3f}   (target >= 0)")
    if len(irs) > 1:
        summary[f"scaling {irs[-1]} / {irs[0]}"] = results[irs[-1]]["docs_per_s"] / results[irs[0]]["docs_per_s"]
        print(f"scaling {irs[-1]} / {irs[0]}: {summary[f'scaling {irs[-1]} / {irs[0]}']:.2f}x throughput")

    print("\nby planted edit rate (recall = flagged / copies with J >= threshold; all% = flagged / all copies)")
    print(f"{'edit':>6}{'copies':>8}{'mean J':>8}{'J>=T':>6}" + "".join(f"{n:>24}" for n in results))
    by_rate = {}
    for rate in EDIT_RATES:
        copies = [(c, jaccard(c, o)) for c, o, r in planted if r == rate]
        true = [c for c, j in copies if j >= args.threshold]
        row = {"copies": len(copies), "mean_jaccard": sum(j for _, j in copies) / max(1, len(copies)), "true": len(true)}
        cells = ""
        for name, r in results.items():
            recall = sum(c in r["matches"] for c in true) / len(true) if true else float("nan")
            flagged_all = sum(c in r["matches"] for c, _ in copies) / max(1, len(copies))
            row[name] = {"recall": recall, "flagged_of_all": flagged_all}
            cells += f"{f'recall {recall:4.2f}' if true else 'recall    -'}  all {flagged_all:4.0%}".rjust(24)
        by_rate[f"{rate:.0%}"] = row
        print(f"{rate:>6.0%}{len(copies):>8}{row['mean_jaccard']:>8.2f}{len(true):>6}" + cells)

    if args.json:
        for r in results.values():
            r.pop("matches")
        report = {"args": {k: str(v) for k, v in vars(args).items()}, "documents": len(docs), "originals": originals,
                  "planted": len(planted), "systems": results, "summary": summary, "by_edit_rate": by_rate}
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
