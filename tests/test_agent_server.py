"""The tool server on real Ray Serve, over real HTTP: the REST API, MCP through the official `mcp`
client and by hand (the protocol's error paths), and `RemoteTools`, the client agents use.

Besides the calculator, three tools defined here (imported by the tool workers) make state,
files and images observable without the Python sandbox.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

import pytest
import requests
import yaml

from internray.agent.remote import RemoteTools, ToolServerError
from internray.agent.tools import ToolContext, ToolError, ToolOutput, function_tool
from internray.config import ConfigError

pytestmark = pytest.mark.slow

APP = "tools-test"
PIXEL = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


@function_tool
def tally(context: ToolContext, add: int = 1) -> str:
    """Add to this session's running total and return it.

    Args:
        add: how much to add
    """
    context.state["total"] = context.state.get("total", 0) + add
    return str(context.state["total"])


@function_tool
def digest(context: ToolContext, name: str) -> str:
    """The SHA-256 of a file in the session's directory.

    Args:
        name: the file's name
    """
    path = context.workdir / name
    if not path.is_file():
        raise ToolError(f"no file {name!r} in this session")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@function_tool
def pixel() -> ToolOutput:
    """A one-pixel PNG."""
    return ToolOutput("one pixel", images=[PIXEL])


@pytest.fixture(scope="module")
def url(ray_cluster):
    """The app under /tools-test on Serve's HTTP proxy: the running one if another module started
    it (its port is the one its tests use), else one started here and shut down afterwards."""
    from ray import serve
    from ray.serve.context import _get_global_client

    from internray.runtime import free_port
    from serve_apps.tool_server import app_builder

    started_here = _get_global_client(raise_if_no_controller_running=False) is None
    if started_here:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    http = _get_global_client().http_config
    here = "tests.test_agent_server"
    serve.run(app_builder({"tools": {"enabled": ["calculator", f"{here}:tally", f"{here}:digest", f"{here}:pixel"]},
                           "executor": {"num_workers": 1, "cpus_per_worker": 0, "call_timeout_s": 30},
                           "max_upload_mb": 1}), name=APP, route_prefix=f"/{APP}")
    host = "127.0.0.1" if http.host in ("0.0.0.0", "") else http.host
    yield f"http://{host}:{http.port}/{APP}"
    serve.delete(APP)
    if started_here:
        serve.shutdown()


def post_tool(url: str, name: str, body) -> requests.Response:
    return requests.post(f"{url}/v1/tools/{name}", json=body, timeout=60)


def test_health_and_the_openai_tools_list(url):
    assert requests.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    tools = requests.get(f"{url}/v1/tools", timeout=30).json()
    assert [t["function"]["name"] for t in tools] == ["calculator", "tally", "digest", "pixel"]
    calculator = tools[0]["function"]["parameters"]
    assert calculator["required"] == ["expression"] and calculator["properties"]["expression"]["type"] == "string"


def test_calling_the_calculator_over_http(url):
    result = post_tool(url, "calculator", {"arguments": {"expression": "(17+5)*3"}}).json()
    assert result["ok"] and result["content"] == "66" and result["name"] == "calculator"
    as_string = post_tool(url, "calculator", {"arguments": '{"expression": "1/4"}'}).json()
    assert as_string["content"] == "0.25"


def test_a_failing_call_is_a_200_with_ok_false_naming_the_problem(url):
    response = post_tool(url, "calculator", {"arguments": {"expresion": "1+1"}})
    assert response.status_code == 200 and not response.json()["ok"]
    assert "`expresion`: unknown argument" in response.json()["content"]
    assert "the name 'x'" in post_tool(url, "calculator", {"arguments": {"expression": "x + 1"}}).json()["content"]
    assert "not valid JSON" in post_tool(url, "calculator", {"arguments": "{oops"}).json()["content"]


def test_wrong_requests_are_http_errors_that_say_why(url):
    unknown = post_tool(url, "calculater", {"arguments": {}})
    assert unknown.status_code == 404 and "'calculater'" in unknown.json()["detail"]
    assert "calculator" in unknown.json()["detail"]
    not_json = requests.post(f"{url}/v1/tools/calculator", data=b"{", timeout=30)
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["detail"]
    extra = post_tool(url, "calculator", {"argument": {"expression": "1"}})
    assert extra.status_code == 422 and "`argument`" in extra.json()["detail"]
    wrong_type = post_tool(url, "calculator", {"arguments": 3})
    assert wrong_type.status_code == 422 and "`arguments" in wrong_type.json()["detail"]


def test_sessions_keep_state_and_calls_without_one_do_not(url):
    def add(session_id=None):
        return post_tool(url, "tally", {"arguments": {"add": 2}, "session_id": session_id}).json()["content"]

    assert [add("rest-a"), add("rest-a"), add("rest-b")] == ["2", "4", "2"]
    assert [add(), add()] == ["2", "2"]
    assert requests.delete(f"{url}/v1/sessions/rest-a", timeout=30).status_code == 204
    assert add("rest-a") == "2"


def test_uploaded_files_arrive_byte_for_byte_and_limits_are_named(url):
    data = bytes(range(256)) * 64 + b"\r\n--not-a-boundary\r\n" + os.urandom(50_000)
    uploaded = requests.post(f"{url}/v1/sessions/files-a/files", timeout=30,
                             files=[("files", ("t.bin", data)), ("files", ("sales.csv", b"x,y\n1,2\n"))]).json()
    assert uploaded == {"session_id": "files-a", "files": ["sales.csv", "t.bin"]}
    check = post_tool(url, "digest", {"arguments": {"name": "t.bin"}, "session_id": "files-a"}).json()
    assert check["content"] == hashlib.sha256(data).hexdigest()

    too_big = requests.post(f"{url}/v1/sessions/files-a/files", files={"f": ("big", b"0" * 1_100_000)}, timeout=30)
    assert too_big.status_code == 413 and "1 MiB" in too_big.json()["detail"]
    hidden = requests.post(f"{url}/v1/sessions/files-a/files", files={"f": (".env", b"x")}, timeout=30)
    assert hidden.status_code == 400 and "plain names only" in hidden.json()["detail"]
    field = requests.post(f"{url}/v1/sessions/files-a/files", data={"note": "hi"}, files={"f": ("a", b"")}, timeout=30)
    assert field.status_code == 400 and "'note' is not a file" in field.json()["detail"]
    raw = requests.post(f"{url}/v1/sessions/files-a/files", data=b"abc", timeout=30)
    assert raw.status_code == 415 and "multipart/form-data" in raw.json()["detail"]


def test_mcp_with_the_official_client(url):
    pytest.importorskip("mcp")
    from mcp import ClientSession, MCPError
    from mcp.client.streamable_http import streamable_http_client

    async def converse():
        async with streamable_http_client(f"{url}/mcp") as (read, write), ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.server_info.name == "internray-tools" and init.capabilities.tools.list_changed is False
            tools = {t.name: t for t in (await session.list_tools()).tools}
            schema = requests.get(f"{url}/v1/tools", timeout=30).json()[0]["function"]["parameters"]
            assert tools["calculator"].input_schema == schema

            power = await session.call_tool("calculator", {"expression": "2**10"})
            assert not power.is_error and [c.text for c in power.content] == ["1024"]
            failed = await session.call_tool("calculator", {"expression": "import os"})
            assert failed.is_error and "not an arithmetic expression" in failed.content[0].text
            totals = [(await session.call_tool("tally", {"add": 5})).content[0].text for _ in range(2)]
            assert totals == ["5", "10"]  # one Mcp-Session-Id, one executor session
            image = (await session.call_tool("pixel", {})).content
            assert image[0].text == "one pixel" and image[1].type == "image" and image[1].mime_type == "image/png"
            assert base64.b64decode(image[1].data) == PIXEL
            with pytest.raises(MCPError, match="unknown tool 'nope'"):
                await session.call_tool("nope", {})
            return init.protocol_version

    assert asyncio.run(converse()) == "2025-11-25"


def mcp_post(url: str, body, session: str | None = None) -> requests.Response:
    headers = {"Mcp-Session-Id": session} if session else {}
    if isinstance(body, bytes):
        return requests.post(f"{url}/mcp", data=body, headers=headers, timeout=30)
    return requests.post(f"{url}/mcp", json=body, headers=headers, timeout=30)


def test_mcp_protocol_edges_by_hand(url):
    init = mcp_post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                          "params": {"protocolVersion": "2025-03-26", "capabilities": {}}})
    session = init.headers["Mcp-Session-Id"]
    assert init.json()["result"]["protocolVersion"] == "2025-03-26"
    old = mcp_post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "1999-01-01"}})
    assert old.json()["result"]["protocolVersion"] == "2025-11-25" and old.headers["Mcp-Session-Id"] != session

    notified = mcp_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    assert notified.status_code == 202 and notified.content == b""
    assert mcp_post(url, {"jsonrpc": "2.0", "id": "p", "method": "ping"}, session).json() == {
        "jsonrpc": "2.0", "id": "p", "result": {}}
    unknown = mcp_post(url, {"jsonrpc": "2.0", "id": 2, "method": "resources/list"}, session).json()
    assert unknown["error"]["code"] == -32601 and "resources/list" in unknown["error"]["message"]
    garbled = mcp_post(url, b"{nope")
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == -32700
    invalid = mcp_post(url, {"id": 3, "method": "ping"})
    assert invalid.status_code == 400 and invalid.json()["error"]["code"] == -32600
    bad_arguments = mcp_post(url, {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                                   "params": {"name": "calculator", "arguments": "2+2"}}, session).json()
    assert bad_arguments["error"]["code"] == -32602 and "arguments must be an object" in bad_arguments["error"]["message"]

    call = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "tally", "arguments": {"add": 1}}}
    batch = mcp_post(url, [call | {"id": 5}, {"jsonrpc": "2.0", "method": "notifications/x"}, call | {"id": 6}],
                     session).json()
    assert sorted(r["result"]["content"][0]["text"] for r in batch) == ["1", "2"]
    assert requests.delete(f"{url}/mcp", headers={"Mcp-Session-Id": session}, timeout=30).status_code == 204
    assert mcp_post(url, call | {"id": 7}, session).json()["result"]["content"][0]["text"] == "1"
    assert requests.get(f"{url}/mcp", timeout=30).status_code == 405


def test_remote_tools_is_a_drop_in_for_the_executor(url):
    tools = RemoteTools(url)
    assert tools.names() == ["calculator", "tally", "digest", "pixel"]
    assert tools.call("remote-a", "calculator", {"expression": "(17+5)*3"}).content == "66"
    results = tools.call_many("remote-a", [("calculator", {"expression": f"{i}*{i}"}) for i in range(6)]
                              + [("calculator", "{bad"), ("nope", {}), ("pixel", {})])
    assert [r.content for r in results[:6]] == ["0", "1", "4", "9", "16", "25"]
    assert not results[6].ok and "not valid JSON" in results[6].content
    assert not results[7].ok and "'nope'" in results[7].content and "calculator" in results[7].content
    assert base64.b64decode(results[8].images[0]) == PIXEL

    assert tools.add_files("remote-a", {"a.txt": b"hello"}) == ["a.txt"]
    assert tools.call("remote-a", "digest", {"name": "a.txt"}).content == hashlib.sha256(b"hello").hexdigest()
    tools.close_session("remote-a")
    assert not tools.call("remote-a", "digest", {"name": "a.txt"}).ok
    with pytest.raises(ToolServerError, match="plain names only"):
        tools.add_files("remote-a", {"../x": b""})

    from internray.runtime import free_port

    gone = RemoteTools(f"http://127.0.0.1:{free_port()}", timeout_s=5)
    result = gone.call("s", "calculator", {"expression": "1"})
    assert not result.ok and "did not answer" in result.content


def test_the_app_args_are_validated_and_the_shipped_config_is_valid():
    from serve_apps.tool_server import ToolServerArgs, app_builder

    with pytest.raises(ConfigError, match="bogus"):
        app_builder({"tools": {"enabled": ["calculator"]}, "bogus": 1})
    with pytest.raises(ConfigError, match="num_workers"):
        app_builder({"executor": {"num_workers": 0}})
    config = yaml.safe_load((Path(__file__).parent.parent / "serve_apps" / "tool_server.yaml").read_text())
    [application] = config["applications"]
    assert application["import_path"] == "serve_apps.tool_server:app_builder"
    assert ToolServerArgs.model_validate(application["args"]).tools.enabled == ["calculator", "python", "data_analysis"]
