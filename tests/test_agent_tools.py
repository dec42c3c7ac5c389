"""The agent's tools as the pool runs them: sandboxed Python (attacked), data analysis charts,
corpus search, and the HTTP tool's host allow-list."""
from __future__ import annotations

import base64
import http.server
import io
import json
import threading

import pytest

from internray.agent.config import ExecutorSection, ToolsSection


@pytest.fixture(scope="module")
def python_pool(ray_cluster):
    from internray.agent.executor import ToolExecutor

    tools = ToolsSection(enabled=["python", "data_analysis"],
                         python={"timeout_s": 3, "memory_mb": 512, "max_output_bytes": 4000})
    pool = ToolExecutor(tools, ExecutorSection(num_workers=1, cpus_per_worker=0, call_timeout_s=30))
    yield pool
    pool.shutdown()


def test_python_session_keeps_its_variables_between_calls(python_pool):
    assert python_pool.call("keep", "python", {"code": "x = 6 * 7"}).ok
    assert python_pool.call("keep", "python", {"code": "x + 1"}).content == "43"
    assert not python_pool.call("other", "python", {"code": "x"}).ok  # another conversation, another namespace


ATTACKS = {
    "read /etc/passwd": "print(open('/etc/passwd').read())",
    "list the root directory": "import os; print(os.listdir('/root'))",
    "write outside": "open('/tmp/internray-escaped.txt', 'w').write('x')",
    "open a socket": "import socket; socket.create_connection(('1.1.1.1', 80), timeout=2)",
    "infinite loop": "while True: pass",
    "fork bomb": "import os\nwhile True: os.fork()",
    "memory bomb": "blocks = []\nwhile True: blocks.append(bytearray(50 * 2**20))",
    "huge output": "while True: print('x' * 10000)",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_sandbox_attacks_end_in_a_tool_error_and_the_pool_keeps_serving(python_pool, attack):
    session = f"attack-{attack.replace(' ', '-').replace('/', '')}"
    result = python_pool.call(session, "python", {"code": ATTACKS[attack]})
    assert not result.ok and result.content, attack
    assert "root:x:0:0" not in result.content
    assert python_pool.call(session, "python", {"code": "1 + 1"}).content == "2"  # the same conversation goes on
    assert python_pool.call("bystander", "python", {"code": "2 + 2"}).content == "4"


def test_nothing_escaped_the_sandbox():
    from pathlib import Path

    assert not Path("/tmp/internray-escaped.txt").exists()


def test_data_analysis_turns_a_csv_into_a_correct_bar_chart(python_pool):
    import matplotlib.image as mpimg
    import numpy as np

    csv = "city,sales\nBeijing,100\nShanghai,300\nShenzhen,200\n".encode()
    python_pool.add_files("chart", {"sales.csv": csv})
    code = ("fig, ax = plt.subplots(figsize=(4, 3), dpi=100)\n"
            "ax.bar(df['city'], df['sales'], color='#ff0000')\n"
            "ax.set_ylim(0, 300); ax.axis('off'); fig.subplots_adjust(0, 0, 1, 1)\n"
            "df.sort_values('sales').iloc[-1]['city']")
    result = python_pool.call("chart", "data_analysis", {"table": "sales.csv", "code": code})
    assert result.ok and "Shanghai" in result.content and len(result.images) == 1
    assert "Matplotlib" not in result.content  # its config directory is writable: no warning, no per-call temp cache
    png = base64.b64decode(result.images[0])
    assert png.startswith(b"\x89PNG")
    pixels = mpimg.imread(io.BytesIO(png), format="png")[..., :3]
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.1) & (pixels[..., 2] < 0.1)
    columns = np.flatnonzero(red.any(axis=0))
    bars = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)  # runs of red columns: one per bar
    heights = [red[:, bar].sum(axis=0).max() for bar in bars]
    assert len(bars) == 3
    assert heights[1] == max(heights) and heights[1] >= pixels.shape[0] - 2  # 300 fills the axes
    assert heights[0] / heights[1] == pytest.approx(1 / 3, abs=0.02)
    assert heights[2] / heights[1] == pytest.approx(2 / 3, abs=0.02)


def test_data_analysis_names_the_tables_it_has(python_pool):
    result = python_pool.call("chart", "data_analysis", {"table": "../etc/passwd", "code": "df"})
    assert not result.ok and "sales.csv" in result.content


def test_search_finds_the_document_about_the_query(tmp_path):
    from internray.agent.tools.base import ToolContext
    from internray.agent.tools.search import CorpusSearch

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(json.dumps({"id": f"d{i}", "text": text}) for i, text in enumerate([
        "Photosynthesis: plants absorb carbon dioxide and release oxygen.",
        "The Great Wall of China stretches across northern China.",
        "北京是中国的首都，有很多历史古迹。",
        "Ray Serve deploys models behind HTTP endpoints with autoscaling.",
    ])))
    search = CorpusSearch(corpus, top_k=2)
    context = ToolContext("s", tmp_path)
    assert search.call(context, {"query": "which gas do plants absorb"}).content.startswith("[1] (d0,")
    assert search.call(context, {"query": "中国的首都"}).content.startswith("[1] (d2,")
    assert "no document matches" in search.call(context, {"query": "zzzz"}).content


def test_search_reads_a_data_stage_run_by_its_documents_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from internray.corpus import load_documents

    docs = tmp_path / "data-run" / "stages" / "decontaminate"
    docs.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["kept text", "dropped text"], "source": ["s", "s"],
                             "drop": [None, "exact_dup"]}), docs / "part-0.parquet")
    (tmp_path / "data-run" / "manifest.json").write_text(json.dumps({"stage": "data", "outputs": {"documents": str(docs)}}))
    assert [d["id"] for d in load_documents(tmp_path / "data-run")] == ["a"]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://example.invalid/steal")
            self.end_headers()
            return
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_http_tool_calls_allowed_hosts_only_and_checks_every_redirect(local_api, tmp_path):
    from internray.agent.tools.base import ToolContext
    from internray.agent.tools.http_api import HTTPGet

    tool, context = HTTPGet(allowed_hosts=["127.0.0.1:*"]), ToolContext("s", tmp_path)
    ok = tool.call(context, {"url": f"{local_api}/weather", "params": {"city": "Beijing"}})
    assert ok.ok and json.loads(ok.content) == {"path": "/weather?city=Beijing"}
    refused = tool.call(context, {"url": "http://example.com/"})
    assert not refused.ok and "host 'example.com' is not allowed" in refused.content
    bounced = tool.call(context, {"url": f"{local_api}/redirect"})
    assert not bounced.ok and "example.invalid" in bounced.content and "not allowed" in bounced.content
    assert not tool.call(context, {"url": "file:///etc/passwd"}).ok
