"""Run directories and the lineage manifest.

Every stage writes into `<root>/<stage>-<timestamp>-<shortid>/`: the effective `config.yaml`,
its outputs, and `manifest.json` (stage, run id, config hash, code version, inputs with content
hashes, parent runs, outputs, counts, metrics). Parents are found by walking up from each input
path to the nearest run directory, so any artifact traces back to the corpus files it came from.

Rerunning the same stage with the same config (same hash) reopens the newest unfinished run
instead of starting over: that is how interrupted jobs resume.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from internray import __version__
from internray.config import Section, config_hash, config_to_yaml

MANIFEST = "manifest.json"


class RunSection(Section):
    """Where runs live and whether a rerun resumes: shared by every stage's config."""

    root: Path = Path("runs")
    resume: Literal["auto", "never"] | Path = "auto"
    """`auto`: reopen the newest unfinished run with the same config; `never`; or a run directory."""


@dataclass
class Run:
    dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    @property
    def resumed(self) -> bool:
        return self.manifest.get("attempts", 1) > 1

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def add_input(self, path: str | Path, role: str = "input", files: list[Path] | None = None) -> None:
        """Record an input with its content hash, and its producing run as a parent if it has one.

        `files`: the files actually read below a directory input (its glob matches); by default all.
        """
        path = Path(path).resolve()
        entry = {"path": str(path), "role": role, "sha256": content_hash(path, files)}
        inputs = [i for i in self.manifest["inputs"] if i["path"] != entry["path"]]
        self.manifest["inputs"] = [*inputs, entry]
        parent = find_run_dir(path)
        if parent is not None and parent != self.dir:
            parent_id = read_manifest(parent)["run_id"]
            if parent_id not in self.manifest["parents"]:
                self.manifest["parents"].append(parent_id)
        self.save()

    def add_output(self, name: str, path: str | Path) -> None:
        self.manifest["outputs"][name] = str(Path(path).resolve())
        self.save()

    def update(self, counts: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
        self.manifest["counts"].update(counts or {})
        self.manifest["metrics"].update(metrics or {})
        self.save()

    def finish(self) -> None:
        self.manifest["status"] = "complete"
        self.manifest["finished_at"] = _now()
        self.save()

    def save(self) -> None:
        """Write the manifest atomically, so a killed job never leaves half a file."""
        tmp = self.path(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=False))
        os.replace(tmp, self.path(MANIFEST))


def open_run(stage: str, config: Section, root: str | Path, resume: str | Path = "auto") -> Run:
    """Create a run directory for `stage`, or reopen an unfinished one (see module docstring)."""
    root = Path(root)
    chash = config_hash(config)
    run_dir = _resumable(stage, chash, root, resume)
    if run_dir is not None:
        manifest = read_manifest(run_dir)
        manifest["attempts"] = manifest.get("attempts", 1) + 1
        run = Run(run_dir, manifest)
        run.save()
        return run
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_id = f"{stage}-{stamp}-{secrets.token_hex(3)}"
    run = Run(root / run_id)
    run.dir.mkdir(parents=True)
    run.path("config.yaml").write_text(config_to_yaml(config))
    run.manifest = {
        "stage": stage,
        "run_id": run_id,
        "status": "running",
        "config_hash": chash,
        "code_version": code_version(),
        "started_at": _now(),
        "attempts": 1,
        "inputs": [],
        "parents": [],
        "outputs": {},
        "counts": {},
        "metrics": {},
    }
    run.save()
    return run


def _resumable(stage: str, chash: str, root: Path, resume: str | Path) -> Path | None:
    if str(resume) == "never":
        return None
    if str(resume) != "auto":
        run_dir = Path(resume)
        manifest = read_manifest(run_dir)
        if manifest["stage"] != stage:
            raise ValueError(f"run.resume={run_dir} is a {manifest['stage']} run, not {stage}")
        return run_dir
    candidates = sorted(root.glob(f"{stage}-*/{MANIFEST}"), reverse=True)
    for manifest_path in candidates:
        manifest = json.loads(manifest_path.read_text())
        if manifest["config_hash"] == chash and manifest["status"] != "complete":
            return manifest_path.parent
    return None


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no {MANIFEST})")
    return json.loads(path.read_text())


def find_run_dir(path: Path) -> Path | None:
    """The run directory that produced `path`, if `path` lies inside one."""
    for candidate in [path, *path.parents]:
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def content_hash(path: Path, files: list[Path] | None = None) -> str:
    """sha256 of a file's bytes, or of a directory's sorted (relative path, file hash) list."""
    if path.is_file():
        return _file_hash(path)
    digest = hashlib.sha256()
    chosen = [Path(f).resolve() for f in files] if files is not None else [p for p in path.rglob("*") if p.is_file()]
    for file in sorted(chosen):
        digest.update(f"{file.relative_to(path)}\0{_file_hash(file)}\n".encode())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+g{sha}" if sha else __version__


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Atomically: a crash mid-write never leaves a half file that a resume would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> Path:
    """Atomically, like `write_jsonl`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return path
