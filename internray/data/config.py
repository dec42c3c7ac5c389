"""The data stage's job config: one section per concern, every field overridable from the CLI."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from internray.config import ExistingPath, Section
from internray.runs import RunSection


class SourceSpec(Section):
    """One input corpus. Every source is normalised to the schema id, text, source, meta."""

    name: str
    type: Literal["jsonl", "parquet", "text_files", "hf_disk", "hf_hub"]
    path: ExistingPath | None = None
    """File or directory (jsonl, parquet, text_files, hf_disk)."""
    hub_name: str | None = None
    """Dataset name for `hf_hub` (needs network access to the hub)."""
    split: str = "train"
    include: list[str] = Field(default_factory=lambda: ["**/*"])
    """Glob patterns relative to `path`, for directory sources."""
    exclude: list[str] = Field(default_factory=list)
    text_field: str = "text"
    id_field: str | None = None
    weight: float = Field(1.0, ge=0)
    """Sampling weight when packing: 0.5 keeps half the documents, 2.0 repeats each twice."""
    max_files: int | None = Field(None, ge=1)
    kind: Literal["auto", "en", "zh", "code", "other"] = "auto"
    """What the documents are, for the quality filters; `auto` detects it per document."""

    @model_validator(mode="after")
    def _location_given(self):
        if self.type == "hf_hub" and not self.hub_name:
            raise ValueError(f"source `{self.name}`: type hf_hub needs `hub_name`")
        if self.type != "hf_hub" and self.path is None:
            raise ValueError(f"source `{self.name}`: type {self.type} needs `path`")
        return self


class CleanSection(Section):
    """Normalisation and Gopher-style quality filters; every removal is counted by reason."""

    unicode_form: Literal["NFC", "NFKC", "none"] = "NFKC"
    languages: list[Literal["en", "zh", "code", "other"]] = Field(default_factory=lambda: ["en", "zh", "code"])
    min_chars: int = Field(50, ge=0)
    max_chars: int = Field(1_000_000, ge=1)
    min_alpha_ratio: float = Field(0.5, ge=0, le=1)
    """Letters (any script) over non-space characters, for prose."""
    code_min_alpha_ratio: float = Field(0.25, ge=0, le=1)
    max_line_chars: int = Field(2_000, ge=1)
    """Longest line allowed: catches minified or generated files."""
    max_dup_line_fraction: float = Field(0.3, ge=0, le=1)
    code_max_dup_line_fraction: float = Field(0.5, ge=0, le=1)
    max_top_2gram_fraction: float = Field(0.2, ge=0, le=1)
    """Share of characters covered by the most frequent word 2-gram (Gopher: 0.20)."""
    max_dup_5gram_fraction: float = Field(0.15, ge=0, le=1)
    """Share of characters inside repeated word 5-grams (Gopher: 0.15)."""


class ExactDedupSection(Section):
    enabled: bool = True


class FuzzyDedupSection(Section):
    """MinHash-LSH near-duplicate removal.

    With `bands` b and `rows` r (b * r = num_perm), two documents of Jaccard similarity s share
    at least one band with probability 1 - (1 - s^r)^b: an S-curve whose midpoint sits near
    (1/b)^(1/r). The defaults (b=16, r=8) give ~0.5 at s=0.7 and > 0.99 at s=0.85; pairs below
    `threshold` that still collide are removed by `verify` (signature-estimated Jaccard).
    """

    enabled: bool = True
    num_perm: int = Field(128, ge=8)
    bands: int = Field(16, ge=1)
    rows: int = Field(8, ge=1)
    threshold: float = Field(0.7, gt=0, le=1)
    shingle: Literal["word", "char"] = "word"
    ngram: int = Field(5, ge=1)
    """Shingle length: words for `word` (each CJK character counts as a word), characters for `char`."""
    verify: bool = True
    seed: int = 42
    partitions: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _bands_fit(self):
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"bands * rows must equal num_perm ({self.bands} * {self.rows} != {self.num_perm})")
        return self


class DecontamSection(Section):
    """n-gram overlap against benchmark files (JSONL; every string field of a record counts)."""

    benchmarks: list[ExistingPath] = Field(default_factory=list)
    ngram: int = Field(13, ge=3)
    action: Literal["drop", "flag"] = "drop"
    min_matches: int = Field(1, ge=1)
    """Shared n-grams needed before a document counts as contaminated."""
    save_corpus_index: bool = True
    """Save the kept corpus' n-gram index so the eval stage can ask what was trained on."""


class TokenizerSection(Section):
    path: ExistingPath | None = None
    """An existing tokenizer directory; when empty, a byte-level BPE is trained on the corpus."""
    vocab_size: int = Field(8192, ge=300)
    min_frequency: int = Field(2, ge=1)
    train_docs: int = Field(50_000, ge=1)
    """Documents sampled (deterministically) to train the tokenizer."""


class PackSection(Section):
    seq_len: int = Field(512, ge=8)
    validation_fraction: float = Field(0.02, ge=0, lt=1)
    rows_per_shard: int = Field(2_000, ge=1)
    group_docs: int = Field(256, ge=1)
    """Documents per pack group (packed together); only a group's last sequence may be shorter."""


class ScalingSection(Section):
    read_concurrency: int | None = Field(None, ge=1)
    map_concurrency: int | None = Field(None, ge=1)
    docs_per_file: int = Field(10_000, ge=1)
    """Documents per Parquet file in the step outputs: a text tree reads one block per file, and
    writing those as they come would leave one tiny file per input file for every later step to open."""


class DataConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    sources: list[SourceSpec] = Field(min_length=1)
    clean: CleanSection = Field(default_factory=CleanSection)
    exact_dedup: ExactDedupSection = Field(default_factory=ExactDedupSection)
    fuzzy_dedup: FuzzyDedupSection = Field(default_factory=FuzzyDedupSection)
    decontaminate: DecontamSection = Field(default_factory=DecontamSection)
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    pack: PackSection = Field(default_factory=PackSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)

    @model_validator(mode="after")
    def _unique_source_names(self):
        names = [s.name for s in self.sources]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"source names must be unique, repeated: {sorted(dup)}")
        return self

