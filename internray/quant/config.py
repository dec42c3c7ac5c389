"""Typed configuration of a quantization run."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from internray.config import ExistingPath, Section
from internray.runs import RunSection


class CalibrationSection(Section):
    """The text AWQ measures activations on: a sample of the data stage's corpus."""

    data: ExistingPath | None = Field(None, description="a data-stage run (its documents), or Parquet/JSONL with "
                                                        "`text`; default: the Python standard library's sources")
    samples: int = Field(32, ge=1, description="windows of seq_len tokens")
    seq_len: int = Field(512, ge=16)
    seed: int = 0


class QuantConfig(Section):
    model: ExistingPath = Field(description="a dense HF checkpoint directory")
    method: Literal["int8", "awq-int4"] = Field(description="int8: per-channel weight-only, round to nearest; "
                                                            "awq-int4: group-wise int4 with activation-aware scales")
    group_size: int = Field(128, ge=16, description="awq-int4: input channels sharing a scale and zero")
    grid: int = Field(20, ge=2, description="awq-int4: scaling exponents tried per group of linears")
    clip: bool = Field(False, description="awq-int4: also search a clipping range per weight group (AWQ's second "
                                          "step). Off by default: it lowers every layer's own output error, but "
                                          "raised SmolLM2-135M's perplexity (benchmarks/quant.py)")
    rounding: Literal["nearest", "gptq"] = Field("gptq", description="awq-int4: how the scaled weights become "
                                                 "codes: nearest level, or GPTQ's error-compensating order "
                                                 "(quant/gptq.py; on SmolLM2-135M it cut AWQ's perplexity loss "
                                                 "from +17% to +6% on held-out text of the calibration's kind, "
                                                 "and to +13% on other prose: benchmarks/quant.py)")
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    out: Path | None = Field(None, description="where the checkpoint goes; default: the run directory's hf/")
    run: RunSection = Field(default_factory=RunSection)
