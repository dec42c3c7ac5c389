"""Exact and MinHash-LSH fuzzy deduplication as distributed Ray operations.

Both work the same way, as a map-reduce through Parquet on the run directory:
1. map: every document becomes small keyed rows (exact: one text hash; fuzzy: one LSH key per
   band, with its signature), written partitioned by `key % partitions`;
2. reduce: one Ray task per partition sorts its rows by key and turns each group of equal keys
   into "duplicate" links; no process ever sees more than one partition;
3. fuzzy only: links are joined into connected components so a chain a~b~c keeps one document.
The output is a Parquet table (id, kept_id) of documents to drop; each group keeps the document
that came first in the input (smallest `seq`), so reruns are deterministic. The disk shuffle keeps memory bounded and makes each
step restartable.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from internray.data.config import FuzzyDedupSection
from internray.data.minhash import MinHasher

DUPLICATES_SCHEMA = pa.schema([("id", pa.string()), ("kept_id", pa.string())])
LINKS_SCHEMA = pa.schema([("id", pa.string()), ("kept_id", pa.string()), ("seq", pa.int64()), ("kept_seq", pa.int64())])
MAX_VERIFY_PER_MEMBER = 32


def exact_key(text: str) -> int:
    """64-bit hash of the text with case and whitespace normalised away."""
    canonical = " ".join(text.lower().split())
    return int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "little")


def exact_duplicates(docs: ray.data.Dataset, work_dir: Path, partitions: int) -> Path:
    """Write (id, kept_id) for every document whose normalised text an earlier id already has."""
    return _map_reduce(docs, work_dir, partitions, _exact_rows, {}, _exact_links, {})


def fuzzy_duplicates(docs: ray.data.Dataset, work_dir: Path, cfg: FuzzyDedupSection) -> Path:
    """Write (id, kept_id) for every document in a near-duplicate cluster except its earliest."""
    params = cfg.model_dump()
    links = _map_reduce(docs, work_dir, cfg.partitions, _band_rows, {"cfg": params}, _band_links, {"cfg": params})
    return ray.get(_connected_components.remote(str(links), str(work_dir / "duplicates")))


def _map_reduce(docs, work_dir: Path, partitions: int, map_fn, map_kwargs, reduce_fn, reduce_kwargs) -> Path:
    buckets, links = work_dir / "buckets", work_dir / "links"
    for stale in (buckets, links):
        shutil.rmtree(stale, ignore_errors=True)
    # A Parquet read may put many small files in one task; splitting first lets the map run
    # `partitions` ways (measured in benchmarks/dedup.py: 0.99x -> 1.5x going from 1 to 2 workers).
    docs.select_columns(["id", "seq", "text"]).repartition(partitions).map_batches(
        map_fn, batch_format="pyarrow", fn_kwargs={**map_kwargs, "partitions": partitions},
    ).write_parquet(str(buckets), partition_cols=["part"])
    parts = [{"dir": str(p)} for p in sorted(buckets.glob("part=*"))]
    links.mkdir(parents=True)
    if parts:
        ray.data.from_items(parts, override_num_blocks=len(parts)).map_batches(
            reduce_fn, batch_size=1, batch_format="pyarrow", fn_kwargs=reduce_kwargs,
        ).write_parquet(str(links))
    return links


def _exact_rows(batch: pa.Table, partitions: int) -> pa.Table:
    keys = np.array([exact_key(t) for t in batch.column("text").to_pylist()], dtype=np.uint64)
    return pa.table({"id": batch.column("id"), "seq": batch.column("seq"), "key": keys,
                     "part": (keys % np.uint64(partitions)).astype(np.int32)})


def _exact_links(batch: pa.Table) -> pa.Table:
    table = pq.read_table(batch.column("dir")[0].as_py()).sort_by([("key", "ascending"), ("seq", "ascending")])
    ids, keys = table.column("id").to_pylist(), table.column("key").to_numpy()
    dup_of, kept, anchor = [], [], None
    for i, doc_id in enumerate(ids):
        if i and keys[i] == keys[i - 1]:
            dup_of.append(doc_id)
            kept.append(anchor)
        else:
            anchor = doc_id
    return pa.table({"id": dup_of, "kept_id": kept}, schema=DUPLICATES_SCHEMA)


def _band_rows(batch: pa.Table, cfg: dict, partitions: int) -> pa.Table:
    section = FuzzyDedupSection.model_validate(cfg)
    hasher = MinHasher(section.num_perm, section.bands, section.rows, section.shingle, section.ngram, section.seed)
    sigs = hasher.signatures(batch.column("text").to_pylist())
    keys = hasher.band_keys(sigs)  # (n, bands)
    n, bands = keys.shape
    sig_bytes = [s.tobytes() for s in sigs]
    return pa.table({
        "id": pa.array(np.repeat(batch.column("id").to_numpy(zero_copy_only=False), bands)),
        "seq": np.repeat(batch.column("seq").to_numpy(), bands),
        "band": np.tile(np.arange(bands, dtype=np.int32), n),
        "key": keys.reshape(-1),
        "sig": pa.array([s for s in sig_bytes for _ in range(bands)], pa.binary()),
        "part": (keys.reshape(-1) % np.uint64(partitions)).astype(np.int32),
    })


def _band_links(batch: pa.Table, cfg: dict) -> pa.Table:
    """Within one partition: documents sharing a band key are linked if similar enough."""
    section = FuzzyDedupSection.model_validate(cfg)
    table = pq.read_table(batch.column("dir")[0].as_py()).sort_by(
        [("band", "ascending"), ("key", "ascending"), ("seq", "ascending")])
    band, key = table.column("band").to_numpy(), table.column("key").to_numpy()
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])])
    ends = np.r_[starts[1:], len(key)]
    ids, seqs, sigs = table.column("id"), table.column("seq"), table.column("sig")
    src, dst = [], []
    for start, end in zip(starts, ends):
        if end - start < 2:
            continue
        group_ids = list(zip(seqs.slice(start, end - start).to_pylist(), ids.slice(start, end - start).to_pylist()))
        group_sigs = [np.frombuffer(s, dtype=np.uint32) for s in sigs.slice(start, end - start).to_pylist()]
        for j in range(1, len(group_ids)):
            for i in range(max(0, j - MAX_VERIFY_PER_MEMBER), j):
                if not section.verify or np.mean(group_sigs[i] == group_sigs[j]) >= section.threshold:
                    src.append(group_ids[j])
                    dst.append(group_ids[i])
                    break
    return pa.table({"id": [s[1] for s in src], "kept_id": [d[1] for d in dst],
                     "seq": [s[0] for s in src], "kept_seq": [d[0] for d in dst]}, schema=LINKS_SCHEMA)


@ray.remote
def _connected_components(links_dir: str, out_dir: str) -> Path:
    """Union-find over the links (only near-duplicates, far fewer than documents)."""
    parent: dict[tuple[int, str], tuple[int, str]] = {}  # nodes are (seq, id): min() is the earliest

    def find(x):
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for file in sorted(Path(links_dir).glob("*.parquet")):
        table = pq.read_table(file)
        for a, b in zip(zip(table.column("seq").to_pylist(), table.column("id").to_pylist()),
                        zip(table.column("kept_seq").to_pylist(), table.column("kept_id").to_pylist())):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the earliest document becomes the root and is kept
    dups = [(member[1], find(member)[1]) for member in sorted(parent) if find(member) != member]
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pq.write_table(pa.table({"id": [d[0] for d in dups], "kept_id": [d[1] for d in dups]}, schema=DUPLICATES_SCHEMA),
                   out / "duplicates.parquet")
    return out


class DropListed:
    """Ray Data UDF: mark rows whose id is in a duplicates table with `drop=<reason>`.

    The id set holds only the documents being removed, loaded once per actor.
    """

    def __init__(self, duplicates_dir: str, reason: str):
        self.ids = {i for file in Path(duplicates_dir).glob("*.parquet")
                    for i in pq.read_table(file, columns=["id"]).column("id").to_pylist()}
        self.reason = reason

    def __call__(self, batch: pa.Table) -> pa.Table:
        drops = [self.reason if i in self.ids and d is None else d
                 for i, d in zip(batch.column("id").to_pylist(), batch.column("drop").to_pylist())]
        return batch.set_column(batch.schema.get_field_index("drop"), "drop", pa.array(drops, pa.string()))
