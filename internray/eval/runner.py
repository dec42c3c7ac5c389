"""An eval run: partition benchmarks into tasks, run them on Ray actors, cache, score, report.

Why tasks: a task (`shard_size` items of one benchmark) is the unit of caching, retry and
progress. Its predictions are written to `predictions/<dataset>/<shard>.jsonl` the moment it
finishes, so a killed run loses at most the tasks in flight, and rerunning the same config (or
`run.resume=<dir>`) reopens the run and sends only the missing tasks to the model. A task that
raises, or whose actor dies, is retried `max_task_retries` times on a fresh actor; after that it
is reported in results.json and the run is left "partial" (a rerun retries it) instead of sinking
the others. Prompts are a pure function of (spec, item) and decoding is greedy by default, so a
rerun on the same model reproduces the scores item by item.
"""
from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.metrics import Gauge

from internray.eval.backends import Generation, make_backend
from internray.eval.benchmarks import (
    BenchmarkSpec,
    Prompter,
    check_items,
    data_path,
    load_items,
    load_spec,
    select,
)
from internray.eval.config import EvalConfig, ModelSection
from internray.eval.contamination import contamination_flags, order_test, order_variants
from internray.eval.judge import Judge
from internray.eval.needle import cell_scores, needle_spec, write_items
from internray.eval.needle import make_items as make_needle_items
from internray.eval.perplexity import bits_per_byte, corpus_perplexity, essays_spec
from internray.eval.report import needle_heatmap, write_report
from internray.eval.scoring import score_choice, score_code, score_generate
from internray.runs import Run, open_run, write_jsonl
from internray.sandbox import SandboxLimits


@dataclass
class Task:
    dataset: str
    shard: int
    payload: dict  # what the worker needs: kind, requests ({id, prompt}), continuations or generation

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.shard:05d}"


@ray.remote
class EvalWorker:
    """Holds one backend (a loaded checkpoint, or an HTTP client pool) and runs tasks on it."""

    def __init__(self, model: dict, threads: int):
        import torch

        torch.set_num_threads(threads)  # Ray starts workers with OMP_NUM_THREADS=1
        self.backend = make_backend(ModelSection(**model))

    def ready(self) -> str:
        return getattr(self.backend, "name", "") or ""

    def run(self, task: dict) -> list[dict]:
        requests = task["requests"]
        if task["kind"] == "choice":
            continuations = task["continuations"]
            pairs = [(r["prompt"], c) for r in requests for c in continuations]
            scores = self.backend.loglikelihood(pairs)
            k = len(continuations)
            return [{"id": r["id"], "loglikelihoods": [s.logprob for s in scores[i * k:(i + 1) * k]],
                     "greedy": [s.greedy for s in scores[i * k:(i + 1) * k]]} for i, r in enumerate(requests)]
        if task["kind"] == "perplexity":
            scores = self.backend.loglikelihood([(r["prompt"], r["text"]) for r in requests])
            return [{"id": r["id"], "logprob": s.logprob, "tokens": s.tokens}
                    for r, s in zip(requests, scores, strict=True)]
        if task["kind"] == "texts":  # the order test: each request scores its own (context, text) pairs
            scores = iter(self.backend.loglikelihood([tuple(p) for r in requests for p in r["pairs"]]))
            return [{"id": r["id"], "loglikelihoods": [next(scores).logprob for _ in r["pairs"]]} for r in requests]
        completions = self.backend.generate([r["prompt"] for r in requests], Generation(**task["generation"]))
        return [{"id": r["id"], "prompt": r["prompt"], "completions": c} for r, c in zip(requests, completions, strict=True)]


def run_eval(config: EvalConfig) -> Run:
    run = open_run("eval", config, config.run.root, config.run.resume)
    log(run, f"{'resumed' if run.resumed else 'started'} in {run.dir}")
    benchmarks = {}
    for name in config.datasets:
        if name == "needle":
            spec = needle_benchmark(run, config)
        elif name == "essays":
            spec = essays_spec(run.dir)
        else:
            spec = load_spec(name)
        pool, skipped = check_items(spec, load_items(spec))
        if skipped:  # counted, written aside with the reason, and left out: never a crash after inference
            write_jsonl(run.path("skipped", f"{spec.name}.jsonl"), skipped)
            log(run, f"{spec.name}: {len(skipped)} unusable records skipped, see skipped/{spec.name}.jsonl")
            run.update(counts={f"{spec.name}_skipped_records": len(skipped)})
        run.add_input(data_path(spec), role=f"benchmark:{spec.name}")
        benchmarks[spec.name] = (spec, select(pool, config.limit, config.shuffle, config.seed), Prompter(spec, pool))
    if config.model.kind == "hf":
        model_dir = Path(config.model.path_or_url)
        run.add_input(model_dir, role="model", files=sorted(model_dir.glob("*.json")))
    tasks = [task for spec, items, prompter in benchmarks.values() for task in make_tasks(spec, items, prompter, config)]
    if config.contamination.order_test:
        tasks += [task for spec, items, prompter in benchmarks.values() if spec.choice_fields
                  for task in order_tasks(spec, items, prompter, config)]
    pending = [t for t in tasks if not prediction_file(run, t).exists()]
    log(run, f"{len(tasks)} tasks over {len(benchmarks)} benchmarks; {len(tasks) - len(pending)} cached, "
             f"{len(pending)} to run on {min(config.num_workers, len(pending))} workers")
    started = time.time()
    failed, startup = run_tasks(run, pending, config) if pending else ({}, 0.0)
    wall = time.time() - started
    results = {"run_id": run.run_id, "created": run.manifest["started_at"],
               "model": {"name": config.model.name or model_name(config.model), "backend": config.model.kind,
                         "path_or_url": config.model.path_or_url},
               "datasets": {}, "timing": {"wall_s": round(wall, 2), "startup_s": round(startup, 2),
                                          "tasks_run": len(pending),
                                          "tasks_cached": len(tasks) - len(pending)}}
    limits = SandboxLimits(timeout_s=config.sandbox_timeout_s, memory_mb=config.sandbox_memory_mb)
    for name, (spec, items, _) in benchmarks.items():
        results["datasets"][name] = score_dataset(run, spec, items, config, limits,
                                                  [key for key in failed if key.startswith(name + "/")])
    if "needle" in results["datasets"]:
        needle_heatmap(cell_scores(results["datasets"]["needle"]["per_category"]), run.path("needle", "heatmap.png"),
                       f"{results['model']['name']}: needle in a haystack")
    results["task_errors"] = failed
    done_items = sum(len(t.payload["requests"]) for t in pending if t.key not in failed)
    inference = wall - startup  # actors started and models loaded before the first task
    results["timing"]["samples_per_s"] = round(done_items / inference, 3) if pending and inference > 0 else None
    run.path("results.json").write_text(json.dumps(results, indent=2))
    for kind, path in write_report(run.dir).items():
        run.add_output(f"report_{kind}", path)
    run.add_output("results", run.path("results.json"))
    run.update(counts={"tasks": len(tasks), "tasks_failed": len(failed)},
               metrics={name: d["score"] for name, d in results["datasets"].items()})
    report_metrics(run, results)
    if failed:
        run.manifest["status"] = "partial"  # a rerun reopens it and retries only the failed tasks
        run.save()
    else:
        run.finish()
    for name, d in results["datasets"].items():
        log(run, f"{name}: {d['metric']} {d['score']:.4f} over {d['n']} items"
                 + (f" ({len(d['failed_tasks'])} tasks failed)" if d["failed_tasks"] else ""))
    return run


def needle_benchmark(run: Run, config: EvalConfig) -> BenchmarkSpec:
    """Write the needle items for this model (a tokenizer measures context where one is at hand)."""
    tokenizer = None
    source = config.needle.tokenizer or (config.model.path_or_url if config.model.kind == "hf" else None)
    if source:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    items = make_needle_items(config.needle.context_lengths, config.needle.depths, tokenizer)
    return needle_spec(write_items(run.path("needle", "items.jsonl"), items), config.needle.max_tokens)


def make_tasks(spec: BenchmarkSpec, items: list[dict], prompter: Prompter, config: EvalConfig) -> list[Task]:
    base = {"kind": spec.kind}
    if spec.kind == "choice":
        base["continuations"] = prompter.continuations()
    elif spec.kind != "perplexity":
        base["generation"] = {"max_tokens": spec.max_tokens, "stop": tuple(spec.stop), "temperature": spec.temperature,
                              "n": spec.num_samples, "seed": config.seed}
    tasks = []
    for shard, start in enumerate(range(0, len(items), config.shard_size)):
        requests = [{"id": item["id"], "prompt": prompter.prompt(item)}
                    | ({"text": item[spec.answer_field]} if spec.kind == "perplexity" else {})
                    for item in items[start:start + config.shard_size]]
        tasks.append(Task(spec.name, shard, base | {"requests": requests}))
    return tasks


def order_tasks(spec: BenchmarkSpec, items: list[dict], prompter: Prompter, config: EvalConfig) -> list[Task]:
    """The order test's loglikelihoods as tasks of their own (`<dataset>.order`): cached and retried
    like the rest. Each text is scored after the preamble, the same context for every ordering."""
    tasks = []
    for shard, start in enumerate(range(0, len(items), config.shard_size)):
        requests = []
        for item in items[start:start + config.shard_size]:
            context = spec.preamble.format(**item) or f"{spec.name}:\n"
            texts = order_variants(spec, item, config.contamination.permutations, config.seed)
            requests.append({"id": item["id"], "pairs": [[context, text] for text in texts]})
        tasks.append(Task(f"{spec.name}.order", shard, {"kind": "texts", "requests": requests}))
    return tasks


def prediction_file(run: Run, task: Task) -> Path:
    return run.path("predictions", task.dataset, f"{task.shard:05d}.jsonl")


def run_tasks(run: Run, tasks: list[Task], config: EvalConfig) -> tuple[dict[str, str], float]:
    """Keep every worker busy until all tasks are done or out of retries; return (failed task ->
    error, seconds spent starting the workers and loading their models)."""
    from tqdm.auto import tqdm

    threads = max(1, int(config.cpus_per_worker))
    options = {"num_cpus": config.cpus_per_worker, "num_gpus": config.gpus_per_worker}

    def new_worker():
        return check_started(EvalWorker.options(**options).remote(config.model.model_dump(), threads), config)

    started = time.time()
    workers = [EvalWorker.options(**options).remote(config.model.model_dump(), threads)
               for _ in range(min(config.num_workers, len(tasks)))]
    for worker in workers:  # they load their models in parallel; a backend that cannot start fails the run now
        check_started(worker, config)
    startup = time.time() - started
    idle, queue = list(range(len(workers))), deque((task, 0) for task in tasks)
    inflight: dict[ray.ObjectRef, tuple[Task, int, int]] = {}
    failed: dict[str, str] = {}
    progress = tqdm(total=sum(len(t.payload["requests"]) for t in tasks), desc=f"eval {run.run_id}", unit="item")
    done_gauge = Gauge("internray_eval_items_done", "items predicted in this run", tag_keys=("run",))
    done = 0
    while queue or inflight:
        while idle and queue:
            slot = idle.pop()
            task, attempt = queue.popleft()
            inflight[workers[slot].run.remote(task.payload)] = (task, slot, attempt)
        [ref], _ = ray.wait(list(inflight), num_returns=1)
        task, slot, attempt = inflight.pop(ref)
        try:
            predictions = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # the worker died: replace it
            workers[slot] = new_worker()
            error = f"worker died: {err}"
        except ray.exceptions.RayTaskError as err:
            error = str(err.cause if getattr(err, "cause", None) else err)
        else:
            write_jsonl(prediction_file(run, task), predictions)
            done += len(predictions)
            progress.update(len(predictions))
            done_gauge.set(done, tags={"run": run.run_id})
            idle.append(slot)
            continue
        idle.append(slot)
        if attempt < config.max_task_retries:
            log(run, f"task {task.key} failed (attempt {attempt + 1}), retrying: {error.splitlines()[-1][:200]}")
            queue.append((task, attempt + 1))
        else:
            log(run, f"task {task.key} failed {attempt + 1} times, giving up: {error.splitlines()[-1][:200]}")
            failed[task.key] = error[-2000:]
    progress.close()
    return failed, startup


def check_started(worker, config: EvalConfig):
    """A backend that cannot start (no such checkpoint, endpoint down) fails the run now, once."""
    try:
        ray.get(worker.ready.remote())
    except ray.exceptions.RayActorError as err:
        raise RuntimeError(f"eval worker could not start its {config.model.kind} backend: {err}") from None
    return worker


def score_dataset(run: Run, spec: BenchmarkSpec, items: list[dict], config: EvalConfig, limits: SandboxLimits,
                  failed_tasks: list[str]) -> dict:
    predictions = read_predictions(run.path("predictions", spec.name))
    scored_items = [item for item in items if item["id"] in predictions]
    preds = [predictions[item["id"]] for item in scored_items]
    if spec.kind == "choice":
        scores = [score_choice(spec, item, p) for item, p in zip(scored_items, preds, strict=True)]
    elif spec.kind == "generate" and spec.judged:
        scores = judge_answers(spec, scored_items, preds, config)
    elif spec.kind == "generate":
        scores = [score_generate(spec, item, p) for item, p in zip(scored_items, preds, strict=True)]
    elif spec.kind == "perplexity":
        scores = [{"logprob": p["logprob"], "tokens": p["tokens"], "bytes": len(item[spec.answer_field].encode())}
                  for item, p in zip(scored_items, preds, strict=True)]
    else:
        scores = score_code(spec, scored_items, preds, limits)
    flags = None
    if config.contamination.data_run is not None:
        flags = contamination_flags(config.contamination.data_run, scored_items, config.contamination.threshold)
    rows = []
    for i, (item, score) in enumerate(zip(scored_items, scores, strict=True)):
        row = {"id": item["id"], **score}
        if spec.group_field:
            row["group"] = str(item.get(spec.group_field))
        if flags is not None:
            row["overlap"], row["contaminated"] = flags[i]
        rows.append(row)
    write_jsonl(run.path("results", f"{spec.name}.jsonl"), rows)
    metric = {"choice": "accuracy", "generate": "exact_match" if spec.match == "exact" else "key_phrase_recall",
              "code": f"pass@{spec.k[0]}", "perplexity": "perplexity"}[spec.kind]
    if spec.judged:
        metric = f"judge_{config.judge.mode}"
        unparsed = sum(r["correct"] is None for r in rows)
        rows = [r for r in rows if r["correct"] is not None]  # unparseable verdicts are counted, not zeroed
    value_key = metric if spec.kind == "code" else "correct"
    aggregate = corpus_perplexity if spec.kind == "perplexity" else lambda rs: mean(float(r[value_key]) for r in rs)
    summary = {"metric": metric, "score": aggregate(rows), "n": len(rows),
               "failed_tasks": failed_tasks, "per_category": {}, "contamination": None}
    if spec.judged:
        summary["judge_unparsed"] = unparsed
    if spec.kind == "perplexity":
        summary |= {"tokens": sum(r["tokens"] for r in rows), "bits_per_byte": bits_per_byte(rows)}
    for group in sorted({r["group"] for r in rows if "group" in r}):
        members = [r for r in rows if r.get("group") == group]
        summary["per_category"][group] = {"score": aggregate(members), "n": len(members)}
    if flags is not None:
        dirty = [r for r in rows if r["contaminated"]]
        clean = [r for r in rows if not r["contaminated"]]
        summary["contamination"] = {
            "method": f"n-gram overlap with data run {Path(config.contamination.data_run).name}",
            "threshold": config.contamination.threshold, "rate": len(dirty) / max(len(rows), 1),
            "contaminated_items": len(dirty),
            "score_contaminated": aggregate(dirty) if dirty else None,
            "score_clean": aggregate(clean) if clean else None}
    order = read_predictions(run.path("predictions", f"{spec.name}.order"))
    if config.contamination.order_test and order:
        lls = [order[item["id"]]["loglikelihoods"] for item in scored_items if item["id"] in order]
        summary["contamination"] = (summary["contamination"] or {"method": "option-order test"}) | {
            "order_test": order_test(lls)}
        if flags is None:  # the order test alone: its rate is the headline
            summary["contamination"]["rate"] = summary["contamination"]["order_test"]["rate"]
    return summary


def judge_answers(spec: BenchmarkSpec, items: list[dict], predictions: list[dict], config: EvalConfig) -> list[dict]:
    if config.judge.model is None:
        raise ValueError(f"benchmark {spec.name} is judged: set judge.model (an OpenAI-compatible chat endpoint)")
    jobs = [{"question": p["prompt"], "answer": p["completions"][0], "reference": item.get(spec.answer_field)}
            for item, p in zip(items, predictions, strict=True)]
    if config.judge.mode == "pairwise":
        if config.judge.baseline_run is None:
            raise ValueError("judge.mode=pairwise needs judge.baseline_run, the eval run to compare against")
        baseline = {key: r["completions"][0] for key, r in
                    read_predictions(Path(config.judge.baseline_run, "predictions", spec.name)).items()}
        missing = [item["id"] for item in items if item["id"] not in baseline]
        if missing:
            raise ValueError(f"baseline run {config.judge.baseline_run} has no answers for {len(missing)} items, "
                             f"e.g. {missing[:3]}")
        for job, item in zip(jobs, items, strict=True):
            job["baseline"] = baseline[item["id"]]
    verdicts = Judge(config.judge.model).judge_all(jobs, config.judge.mode)
    return [{"pred": job["answer"][:200], "correct": v["score"], **{k: v[k] for k in v if k != "score"}}
            for job, v in zip(jobs, verdicts, strict=True)]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def model_name(model: ModelSection) -> str:
    """A checkpoint's directory name; a run's export (`<run>/hf`) is named after its run."""
    if model.kind != "hf":
        return model.path_or_url
    path = Path(model.path_or_url)
    return path.parent.name if path.name == "hf" else path.name


def read_predictions(directory: Path) -> dict[str, dict]:
    """Every cached prediction of one dataset (all its task files), by item id."""
    return {record["id"]: record for path in sorted(directory.glob("*.jsonl"))
            for record in map(json.loads, path.read_text().splitlines())}


def report_metrics(run: Run, results: dict) -> None:
    """Scores into Ray's metrics pipeline, so the dashboard's Metrics view shows each run."""
    score = Gauge("internray_eval_score", "benchmark score of a run", tag_keys=("run", "dataset", "metric"))
    for name, d in results["datasets"].items():
        score.set(d["score"], tags={"run": run.run_id, "dataset": name, "metric": d["metric"]})


def log(run: Run, message: str) -> None:
    print(f"[internray eval {run.run_id}] {message}", flush=True)
