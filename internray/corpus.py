"""Read a corpus the data stage produced, for the stages that use text rather than tokens:
the agent's search tool indexes it, quantization calibrates on a sample of it."""
from __future__ import annotations

import json
from pathlib import Path

from internray.runs import find_run_dir, read_manifest


def load_documents(corpus: Path) -> list[dict]:
    """[{id, text, source}] from a data run, a Parquet file/directory or a JSONL file."""
    import pyarrow.dataset as ds

    run_dir = find_run_dir(corpus) if corpus.is_dir() else None
    if run_dir is not None and run_dir == corpus:
        outputs = read_manifest(run_dir).get("outputs", {})
        if "documents" not in outputs:
            raise ValueError(f"corpus {corpus}: this run has no `documents` output (is it a data-stage run?)")
        corpus = Path(outputs["documents"])
    if corpus.suffix == ".jsonl":
        rows = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        table = ds.dataset(str(corpus), format="parquet").to_table()
        if "drop" in table.column_names:
            table = table.filter(table["drop"].is_null())
        rows = table.select([c for c in ("id", "text", "source") if c in table.column_names]).to_pylist()
    return [{"id": str(r.get("id", i)), "text": r["text"], "source": r.get("source")} for i, r in enumerate(rows)
            if isinstance(r.get("text"), str)]
