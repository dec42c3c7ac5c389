"""Read every kind of source into one record schema, streaming, with bad input set aside.

A source is split into read units (one per file, or one per shard of a Hugging Face dataset);
Ray Data runs one task per unit and each task yields records in small batches, so no file and
no corpus is ever held whole. Records that cannot be read (malformed JSON, undecodable bytes,
empty or missing text) are not dropped silently: they come out with `drop="reject:<reason>"`
and their source location as id, and the pipeline writes them to the rejects dataset.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from internray.data.config import SourceSpec

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
    ("meta", pa.string()),
    ("drop", pa.string()),
    ("seq", pa.int64()),
])
"""`seq` orders records as they appear in the input (unit index, then position): dedup keeps the earliest."""
BATCH_ROWS = 512
SNIPPET_CHARS = 500
HF_SHARD_ROWS = 20_000


def read_sources(sources: list[SourceSpec], concurrency: int | None = None) -> ray.data.Dataset:
    """All sources as one dataset of SCHEMA rows (kept and rejected alike)."""
    units = [{**unit, "index": i} for i, unit in enumerate(u for spec in sources for u in read_units(spec))]
    if not units:
        raise ValueError("the sources matched no input files: " + ", ".join(f"{s.name}={s.path}" for s in sources))
    specs = {spec.name: spec.model_dump(mode="json") for spec in sources}
    return ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _read_batch_of_units, batch_size=1, batch_format="pyarrow", fn_kwargs={"specs": specs},
        concurrency=concurrency,
    )


def read_units(spec: SourceSpec) -> list[dict[str, Any]]:
    """The independent pieces of work a source splits into."""
    if spec.type == "hf_disk":
        return [{"source": spec.name, "shard": i, "shards": n} for i, n in _hf_shards(_load_hf(spec))]
    if spec.type == "hf_hub":
        return [{"source": spec.name, "shard": 0, "shards": 1}]
    return [{"source": spec.name, "file": str(f)} for f in list_files(spec)]


def list_files(spec: SourceSpec) -> list[Path]:
    root = Path(spec.path)
    if root.is_file():
        return [root]
    files = {p for pattern in spec.include for p in root.glob(pattern) if p.is_file()}
    files -= {p for pattern in spec.exclude for p in root.glob(pattern)}
    if spec.type == "jsonl":
        files = {p for p in files if p.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz"))}
    elif spec.type == "parquet":
        files = {p for p in files if p.suffix == ".parquet"}
    ordered = sorted(files)
    return ordered[: spec.max_files] if spec.max_files else ordered


def _read_batch_of_units(batch: pa.Table, specs: dict[str, dict]) -> Iterator[pa.Table]:
    for unit in batch.to_pylist():
        spec = SourceSpec.model_validate(specs[unit["source"]])
        rows: list[dict] = []
        for position, record in enumerate(READERS[spec.type](spec, unit)):
            rows.append({**record, "seq": (unit["index"] << 32) + position})
            if len(rows) >= BATCH_ROWS:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SCHEMA)


def _record(spec: SourceSpec, doc_id: str, text: Any, meta: dict | None = None, location: str = "") -> dict:
    """A normalised record, or a reject if the text is missing, not a string, or blank."""
    if not isinstance(text, str):
        reason = "missing_text" if text is None else "text_not_a_string"
        return _reject(spec, doc_id, reason, repr(text)[:SNIPPET_CHARS], location)
    if not text.strip():
        return _reject(spec, doc_id, "empty_text", "", location)
    return {"id": doc_id, "text": text, "source": spec.name, "meta": json.dumps(meta or {}, ensure_ascii=False), "drop": None}


def _reject(spec: SourceSpec, location_id: str, reason: str, snippet: str, detail: str = "") -> dict:
    meta = {"location": location_id, "detail": detail} if detail else {"location": location_id}
    return {"id": location_id, "text": snippet, "source": spec.name, "meta": json.dumps(meta, ensure_ascii=False), "drop": f"reject:{reason}"}


def _relative(spec: SourceSpec, file: Path) -> str:
    root = Path(spec.path)
    return file.name if root.is_file() else str(file.relative_to(root))


def _read_jsonl(spec: SourceSpec, unit: dict) -> Iterator[dict]:
    file = Path(unit["file"])
    opener = gzip.open if file.name.endswith(".gz") else open
    rel = _relative(spec, file)
    with opener(file, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            location = f"{spec.name}:{rel}:{lineno}"
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield _reject(spec, location, "undecodable_bytes", raw[:SNIPPET_CHARS].decode("utf-8", "replace"), str(err))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield _reject(spec, location, "malformed_json", line[:SNIPPET_CHARS], str(err))
                continue
            if not isinstance(obj, dict):
                yield _reject(spec, location, "not_an_object", line[:SNIPPET_CHARS])
                continue
            doc_id = f"{spec.name}:{obj[spec.id_field]}" if spec.id_field and spec.id_field in obj else location
            meta = {k: v for k, v in obj.items() if k not in (spec.text_field, spec.id_field)}
            yield _record(spec, doc_id, obj.get(spec.text_field), meta, location)


def _read_text_file(spec: SourceSpec, unit: dict) -> Iterator[dict]:
    file = Path(unit["file"])
    location = f"{spec.name}:{_relative(spec, file)}"
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield _reject(spec, location, "undecodable_bytes", data[:SNIPPET_CHARS].decode("utf-8", "replace"), str(err))
        return
    yield _record(spec, location, text, {"path": _relative(spec, file)}, location)


def _read_parquet(spec: SourceSpec, unit: dict) -> Iterator[dict]:
    file = Path(unit["file"])
    rel = _relative(spec, file)
    row = 0
    for batch in pq.ParquetFile(file).iter_batches(batch_size=BATCH_ROWS):
        for obj in batch.to_pylist():
            yield _row_record(spec, obj, f"{spec.name}:{rel}:{row}")
            row += 1


def _read_hf(spec: SourceSpec, unit: dict) -> Iterator[dict]:
    dataset = _load_hf(spec).shard(unit["shards"], unit["shard"], contiguous=True)
    offset = _shard_offset(len(_load_hf(spec)), unit["shards"], unit["shard"]) if spec.type == "hf_disk" else 0
    for row, obj in enumerate(dataset, start=offset):
        yield _row_record(spec, obj, f"{spec.name}:{row}")


def _row_record(spec: SourceSpec, obj: dict, location: str) -> dict:
    if spec.text_field not in obj:
        return _reject(spec, location, "missing_text", json.dumps(obj, default=str)[:SNIPPET_CHARS])
    doc_id = f"{spec.name}:{obj[spec.id_field]}" if spec.id_field and obj.get(spec.id_field) is not None else location
    meta = {k: v for k, v in obj.items() if k not in (spec.text_field, spec.id_field)}
    return _record(spec, doc_id, obj[spec.text_field], json.loads(json.dumps(meta, default=str)), location)


def _load_hf(spec: SourceSpec):
    import datasets

    if spec.type == "hf_disk":
        loaded = datasets.load_from_disk(str(spec.path))
        return loaded[spec.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return datasets.load_dataset(spec.hub_name, split=spec.split)


def _hf_shards(dataset) -> list[tuple[int, int]]:
    shards = max(1, -(-len(dataset) // HF_SHARD_ROWS))
    return [(i, shards) for i in range(shards)]


def _shard_offset(total: int, shards: int, index: int) -> int:
    """First row of a contiguous shard, as `datasets.Dataset.shard(contiguous=True)` splits."""
    div, mod = divmod(total, shards)
    return div * index + min(index, mod)


READERS = {
    "jsonl": _read_jsonl,
    "text_files": _read_text_file,
    "parquet": _read_parquet,
    "hf_disk": _read_hf,
    "hf_hub": _read_hf,
}
