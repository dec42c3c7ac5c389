"""The data stage: sources -> clean -> exact dedup -> fuzzy dedup -> decontaminate -> tokenize + pack.

Each step reads the previous step's kept rows from Parquet and writes all the rows it saw, with
`drop` set on the ones it removed, to `stages/<step>/`. A step that finished leaves a `_SUCCESS`
marker; rerunning the same config reopens the run (see `runs.open_run`) and skips finished
steps, and a half-written step is cleared and redone, so an interrupted run completes without
duplicated output. Removal reasons are counted from those Parquet files at the end, which is
why the manifest balances by construction and by check: input = kept + every removal reason.
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.expressions import col
from ray.util.metrics import Gauge

from internray.data.clean import clean_batch
from internray.data.config import DataConfig
from internray.data.decontam import MarkContaminated, build_benchmark_index, corpus_ngram_rows
from internray.data.dedup import DropListed, exact_duplicates, fuzzy_duplicates
from internray.data.sources import list_files, read_sources
from internray.data.tokenize import Tokenize, pack_group, train_tokenizer, unit_hash
from internray.runs import Run, open_run

STEPS = ["ingest", "exact_dedup", "fuzzy_dedup", "decontaminate"]


def run_data(config: DataConfig) -> Run:
    """Run (or resume) the data stage and return its finished run."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same config, same shards
    run = open_run("data", config, config.run.root, config.run.resume)
    _log(run, f"run directory {run.dir}" + (" (resuming)" if run.resumed else ""))
    for source in config.sources:
        if source.type == "hf_disk":
            run.add_input(source.path, role=f"source:{source.name}")
        elif source.path is not None:
            run.add_input(source.path, role=f"source:{source.name}", files=list_files(source))
    for bench in config.decontaminate.benchmarks:
        run.add_input(bench, role="benchmark")
    if config.tokenizer.path is not None:
        run.add_input(config.tokenizer.path, role="tokenizer")

    _step(run, "ingest", lambda out: read_sources(config.sources, config.scaling.read_concurrency)
          .map_batches(clean_batch, batch_format="pyarrow", fn_kwargs={"cfg": config.clean.model_dump(), "kinds": {s.name: s.kind for s in config.sources}})
          .write_parquet(str(out), min_rows_per_file=config.scaling.docs_per_file))
    _step(run, "exact_dedup", lambda out: _drop_listed(
        run, "ingest", out, "exact_dup", config,
        lambda docs: exact_duplicates(docs, run.path("work", "exact"), config.fuzzy_dedup.partitions),
        enabled=config.exact_dedup.enabled))
    _step(run, "fuzzy_dedup", lambda out: _drop_listed(
        run, "exact_dedup", out, "fuzzy_dup", config,
        lambda docs: fuzzy_duplicates(docs, run.path("work", "fuzzy"), config.fuzzy_dedup),
        enabled=config.fuzzy_dedup.enabled))
    _step(run, "decontaminate", lambda out: _decontaminate(run, out, config))
    # The documents as text (rows with a `drop` reason were removed): what agents search.
    run.add_output("documents", run.path("stages", "decontaminate"))
    final = kept(run, "decontaminate")

    if config.decontaminate.save_corpus_index:
        _step(run, "ngram_index", lambda out: _ngram_index(final, out, config.decontaminate.ngram))
        run.add_output("ngram_index", run.path("stages", "ngram_index"))
    _step(run, "tokenizer", lambda out: _tokenizer(final, out, config))
    run.add_output("tokenizer", run.path("stages", "tokenizer"))
    for split in ("train", "validation"):
        _step(run, split, lambda out, split=split: _pack(final, out, split, config, run))
        run.add_output(split, run.path("stages", split))

    _step(run, "rejects", lambda out: ray.data.read_parquet(str(run.path("stages", "ingest")))
          .map_batches(lambda b: b.filter(pc.starts_with(b["drop"], "reject:")), batch_format="pyarrow")
          .write_parquet(str(out), min_rows_per_file=config.scaling.docs_per_file))
    run.add_output("rejects", run.path("stages", "rejects"))
    summary = _summarize(run)
    run.update(counts=summary)
    _report_metrics(run, summary)
    print(format_summary(summary), flush=True)
    run.finish()
    _log(run, f"done: outputs in {run.dir}")
    return run


def kept(run: Run, step: str) -> ray.data.Dataset:
    return ray.data.read_parquet(str(run.path("stages", step))).filter(expr=col("drop").is_null())


def _step(run: Run, name: str, produce: Callable[[Path], object]) -> None:
    out = run.path("stages", name)
    if (out / "_SUCCESS").exists():
        _log(run, f"step {name}: already done, skipped")
        return
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.time()
    _log(run, f"step {name}: started")
    produce(out)
    (out / "_SUCCESS").write_text(json.dumps({"seconds": round(time.time() - started, 2)}))
    _log(run, f"step {name}: finished in {time.time() - started:.1f}s")


def _drop_listed(run: Run, previous: str, out: Path, reason: str, config: DataConfig,
                 find: Callable[[ray.data.Dataset], Path], enabled: bool) -> None:
    docs = kept(run, previous)
    if enabled:
        duplicates = find(docs)
        docs = docs.map_batches(DropListed, batch_format="pyarrow", fn_constructor_args=(str(duplicates), reason),
                                concurrency=_actors(config))
    docs.write_parquet(str(out), min_rows_per_file=config.scaling.docs_per_file)


def _decontaminate(run: Run, out: Path, config: DataConfig) -> None:
    docs = kept(run, "fuzzy_dedup")
    section = config.decontaminate
    if section.benchmarks:
        index = run.path("work", "benchmark_ngrams.parquet")
        run.update(counts=build_benchmark_index(section.benchmarks, section.ngram, index))
        run.add_output("benchmark_ngrams", index)
        docs = docs.map_batches(
            MarkContaminated, batch_format="pyarrow", concurrency=_actors(config),
            fn_constructor_args=(str(index), section.ngram, section.min_matches, section.action))
    docs.write_parquet(str(out), min_rows_per_file=config.scaling.docs_per_file)


def _ngram_index(docs: ray.data.Dataset, out: Path, n: int) -> None:
    docs.select_columns(["text"]).map_batches(corpus_ngram_rows, batch_format="pyarrow", fn_kwargs={"n": n}) \
        .write_parquet(str(out))
    (out / "meta.json").write_text(json.dumps({"ngram": n, "hash": "pandas.util.hash_array(siphash) of lowercase tokens"}))


def _tokenizer(docs: ray.data.Dataset, out: Path, config: DataConfig) -> None:
    if config.tokenizer.path is not None:
        shutil.copytree(config.tokenizer.path, out, dirs_exist_ok=True)
        return
    total = docs.count()
    fraction = min(1.0, config.tokenizer.train_docs / max(1, total))
    texts = (text for batch in docs.select_columns(["id", "text"]).iter_batches(batch_size=256, batch_format="pyarrow")
             for doc_id, text in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist())
             if unit_hash(doc_id, "tokenizer") < fraction)
    train_tokenizer(texts, config.tokenizer.vocab_size, config.tokenizer.min_frequency, out)


def _pack(docs: ray.data.Dataset, out: Path, split: str, config: DataConfig, run: Run) -> None:
    weights = {s.name: s.weight for s in config.sources}
    share = config.pack.validation_fraction if split == "validation" else 1 - config.pack.validation_fraction
    groups = max(1, round(docs.count() * share / config.pack.group_docs))
    # no more shuffle partitions than groups: Ray's default (200) costs ~20 s on a small corpus
    partitions = min(groups, ray.data.DataContext.get_current().default_hash_shuffle_parallelism)
    docs.map_batches(
        Tokenize, batch_format="pyarrow", concurrency=_actors(config),
        fn_constructor_args=(str(run.path("stages", "tokenizer")), weights, split, config.pack.validation_fraction,
                             groups),
    ).groupby("group", num_partitions=partitions).map_groups(
        pack_group, batch_format="pyarrow", fn_kwargs={"seq_len": config.pack.seq_len},
    ).write_parquet(str(out), min_rows_per_file=config.pack.rows_per_shard)


def _summarize(run: Run) -> dict:
    """Counts by outcome, straight from the step outputs; `balanced` checks input = kept + removed."""
    removed: Counter[str] = Counter()
    for counts in ray.data.read_parquet([str(run.path("stages", s)) for s in STEPS]).select_columns(["drop"]) \
            .map_batches(_drop_counts, batch_format="pyarrow").iter_rows():
        removed[counts["drop"]] += counts["count"]
    input_records = ray.data.read_parquet(str(run.path("stages", "ingest"))).count()
    kept_docs = kept(run, STEPS[-1]).count()
    summary = {"input_records": input_records, "kept_documents": kept_docs, "removed": dict(sorted(removed.items()))}
    summary["balanced"] = summary["input_records"] == kept_docs + sum(removed.values())
    for split in ("train", "validation"):
        packed = ray.data.read_parquet(str(run.path("stages", split)))
        summary[split] = {"sequences": packed.count(), "tokens": int(packed.sum("num_tokens") or 0)}
    return summary


def _drop_counts(batch: pa.Table) -> pa.Table:
    """Rows per drop reason in one block: a few rows per block, summed on the driver (no shuffle)."""
    counts = pc.value_counts(batch.column("drop").drop_null())
    return pa.table({"drop": counts.field("values"), "count": counts.field("counts")})


def format_summary(summary: dict) -> str:
    lines = ["", "data stage summary", "-" * 44, f"{'input records':<34}{summary['input_records']:>10}"]
    for reason, count in summary["removed"].items():
        lines.append(f"  - {reason:<30}{count:>10}")
    lines.append(f"{'kept documents':<34}{summary['kept_documents']:>10}")
    for split in ("train", "validation"):
        s = summary[split]
        lines.append(f"{split + ' sequences / tokens':<34}{s['sequences']:>10} / {s['tokens']}")
    lines.append(f"{'balanced (input = kept + removed)':<34}{str(summary['balanced']):>10}")
    return "\n".join(lines)


def _report_metrics(run: Run, summary: dict) -> None:
    """Totals into Ray's metrics pipeline, so the dashboard's Metrics view shows each run.

    Gauges, not counters: a resumed run reports its totals again and must not double them.
    """
    documents = Gauge("internray_data_documents", "documents by outcome", tag_keys=("run", "outcome"))
    documents.set(summary["kept_documents"], tags={"run": run.run_id, "outcome": "kept"})
    for reason, count in summary["removed"].items():
        documents.set(count, tags={"run": run.run_id, "outcome": reason})
    tokens = Gauge("internray_data_tokens", "packed tokens by split", tag_keys=("run", "split"))
    for split in ("train", "validation"):
        tokens.set(summary[split]["tokens"], tags={"run": run.run_id, "split": split})


def _actors(config: DataConfig) -> tuple[int, int]:
    most = config.scaling.map_concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)))
    return (1, most)


def _log(run: Run, message: str) -> None:
    print(f"[internray data {run.run_id}] {message}", flush=True)
