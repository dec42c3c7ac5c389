"""The tool server: the Ray tool pool behind HTTP, for agents and MCP clients that run elsewhere.

AgentLego's RemoteTool idea: tools live where their dependencies and sandboxes are (the cluster),
and an agent anywhere reaches them by URL (`internray.agent.remote.RemoteTools`). The same pool
also speaks the Model Context Protocol, so MCP clients (IDEs, other agent frameworks) can use it.

    GET    /health                             liveness
    GET    /v1/tools                           the OpenAI `tools` list
    POST   /v1/tools/{name}                    {"arguments": {...} | "json", "session_id"?} -> a ToolResult dict
    POST   /v1/sessions/{session_id}/files     multipart upload into the session's directory
    DELETE /v1/sessions/{session_id}           end a session (its interpreter and files)
    POST   /mcp, DELETE /mcp                   MCP over streamable HTTP, JSON responses only

A tool that fails is a 200 with ok=false, like a function's error result: the model reads it and
corrects itself. HTTP errors are for requests that are wrong (no such tool, a malformed body). A
call without a session id runs in a session of its own that ends with the call. MCP clients get
a session at `initialize` (the `Mcp-Session-Id` header), so a Python interpreter keeps its
variables across their calls. There is no authentication: serve this on a private network only.

FastAPI reads the handlers' annotations at runtime, so no `from __future__ import annotations`.
"""
import json
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

import internray
from internray.agent.tools import ToolResult

MAX_UPLOAD_BYTES = 50 * 2**20
MCP_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
"""MCP revisions served, newest first; the part used here (tools, ping) is the same in all."""
MCP_SESSION_HEADER = "Mcp-Session-Id"
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS = -32700, -32600, -32601, -32602


class ToolCallBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arguments: dict[str, Any] | str = Field(default_factory=dict, description="an object, or it as a JSON string")
    session_id: str | None = Field(None, min_length=1, max_length=200)


def build_tool_app(executor, max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """The HTTP and MCP API over `executor` (a ToolExecutor, or anything with its methods).
    Executor calls block on Ray, so they run in the threadpool, never on the event loop."""
    app = FastAPI(title="internray tools")
    mcp = McpHandler(executor)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/tools")
    def list_tools():
        return executor.schemas()

    @app.post("/v1/tools/{name}")
    async def call(name: str, request: Request):
        body = parse_body(await request.body(), ToolCallBody)
        result = await run_in_threadpool(_call_known_tool, executor, body.session_id, name, body.arguments)
        return result.to_dict()

    @app.post("/v1/sessions/{session_id}/files")
    async def upload(session_id: str, request: Request):
        data = await read_limited(request, max_upload_bytes)
        files = await run_in_threadpool(multipart_files, request.headers.get("content-type", ""), data)
        try:
            names = await run_in_threadpool(executor.add_files, session_id, files)
        except ValueError as err:  # a bad file name; from the worker it is a RayTaskError whose cause says why
            raise HTTPException(400, str(getattr(err, "cause", err))) from None
        return {"session_id": session_id, "files": names}

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    def close(session_id: str):
        executor.close_session(session_id)

    @app.post("/mcp")
    async def mcp_post(request: Request):
        return await run_in_threadpool(mcp.handle, await request.body(), request.headers.get(MCP_SESSION_HEADER))

    @app.get("/mcp")
    def mcp_stream():
        return JSONResponse({"detail": "this server sends no server-initiated messages; POST requests to /mcp"},
                            status_code=405, headers={"Allow": "POST, DELETE"})

    @app.delete("/mcp", status_code=204)
    def mcp_end(request: Request):
        session = request.headers.get(MCP_SESSION_HEADER)
        if not session:
            raise HTTPException(400, f"DELETE /mcp ends a session: send its {MCP_SESSION_HEADER} header")
        executor.close_session(session)

    return app


def call_in_session(executor, session_id: str | None, name: str, arguments: dict | str) -> ToolResult:
    """A call in `session_id`, or, without one, in a session of its own that ends with the call
    (so a stateless client leaves no interpreter or directory behind)."""
    if session_id is not None:
        return executor.call(session_id, name, arguments)
    session_id = f"oneoff-{uuid.uuid4().hex}"
    try:
        return executor.call(session_id, name, arguments)
    finally:
        executor.close_session(session_id)


def _call_known_tool(executor, session_id: str | None, name: str, arguments: dict | str) -> ToolResult:
    if name not in executor.names():
        raise HTTPException(404, f"there is no tool named {name!r} (tools: {', '.join(executor.names())})")
    return call_in_session(executor, session_id, name, arguments)


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """The JSON body as `model`; a 400 naming the JSON error or a 422 naming the bad fields."""
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HTTPException(400, f"the request body is not valid JSON: {err}") from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"`{'.'.join(map(str, e['loc'])) or 'body'}`: {e['msg']}" for e in err.errors())
        raise HTTPException(422, f"invalid request body: {problems}") from None


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (not after reading it all)."""
    too_big = HTTPException(413, f"the upload is larger than {limit / 2**20:g} MiB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def multipart_files(content_type: str, data: bytes) -> dict[str, bytes]:
    """{file name: bytes} of a multipart/form-data body, parsed with the stdlib email parser so
    the server needs no `python-multipart`. Every part must be a file."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise HTTPException(415, f"upload files as multipart/form-data, not {content_type or 'no content type'!r}")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
                                                  + data)
    if not message.is_multipart():
        raise HTTPException(400, "the multipart body could not be parsed (is the boundary right?)")
    files = {}
    for part in message.iter_parts():
        name = part.get_filename()
        if not name:
            field = part.get_param("name", header="content-disposition")
            raise HTTPException(400, f"form field {field!r} is not a file; send files only")
        files[name] = part.get_payload(decode=True)
    if not files:
        raise HTTPException(400, "the upload has no files")
    return files


class RpcError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class McpHandler:
    """The MCP tools server, stateless between requests: each POST is answered in its body as
    JSON, and the session id only names the executor session the calls run in."""

    def __init__(self, executor):
        self.executor = executor
        self.methods: dict[str, Callable[[dict, str | None], dict]] = {
            "initialize": self.initialize, "ping": lambda params, session: {},
            "tools/list": self.list_tools, "tools/call": self.call_tool}

    def handle(self, raw: bytes, session: str | None) -> Response:
        """One POST: a message or a batch of them. Only notifications -> 202 with no body; a body
        that is not JSON-RPC at all -> 400 carrying the error."""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return JSONResponse(rpc_error(None, PARSE_ERROR, f"the body is not valid JSON: {err}"), status_code=400)
        if body == []:
            return JSONResponse(rpc_error(None, INVALID_REQUEST, "an empty batch"), status_code=400)
        if not isinstance(body, list) and not is_message(body):
            return JSONResponse(self.answer(body, session), status_code=400)
        messages = body if isinstance(body, list) else [body]
        headers = {}
        if any(is_message(m) and m["method"] == "initialize" for m in messages):
            session = f"mcp-{uuid.uuid4().hex}"
            headers[MCP_SESSION_HEADER] = session
        replies = [reply for m in messages if (reply := self.answer(m, session)) is not None]
        if not replies:
            return Response(status_code=202, headers=headers)
        return JSONResponse(replies if isinstance(body, list) else replies[0], headers=headers)

    def answer(self, message: Any, session: str | None) -> dict | None:
        """The reply to one JSON-RPC message; None for a notification, which gets none."""
        if not is_message(message):
            request_id = message.get("id") if isinstance(message, dict) else None
            return rpc_error(request_id, INVALID_REQUEST, 'a JSON-RPC 2.0 message needs "jsonrpc": "2.0" and a '
                                                          'string "method"')
        if "id" not in message:
            return None  # notifications/initialized, notifications/cancelled, ...: nothing to do
        method, params = message["method"], message.get("params") or {}
        handler = self.methods.get(method)
        if handler is None:
            return rpc_error(message["id"], METHOD_NOT_FOUND, f"method {method!r} not found (served: "
                                                              f"{', '.join(self.methods)})")
        try:
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be an object")
            return {"jsonrpc": "2.0", "id": message["id"], "result": handler(params, session)}
        except RpcError as err:
            return rpc_error(message["id"], err.code, err.message)

    def initialize(self, params: dict, session: str | None) -> dict:
        """Echo the client's protocol version when served, else offer the newest."""
        asked = params.get("protocolVersion")
        return {"protocolVersion": asked if asked in MCP_VERSIONS else MCP_VERSIONS[0],
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "internray-tools", "version": internray.__version__}}

    def list_tools(self, params: dict, session: str | None) -> dict:
        return {"tools": [{"name": s["function"]["name"], "description": s["function"]["description"],
                           "inputSchema": s["function"]["parameters"]} for s in self.executor.schemas()]}

    def call_tool(self, params: dict, session: str | None) -> dict:
        """A tool's failure is a result with isError (the model reads it); an unknown tool or
        non-object arguments are protocol errors, as the MCP specification says."""
        name, arguments = params.get("name"), params.get("arguments") or {}
        if name not in self.executor.names():
            raise RpcError(INVALID_PARAMS, f"unknown tool {name!r} (tools: {', '.join(self.executor.names())})")
        if not isinstance(arguments, dict):
            raise RpcError(INVALID_PARAMS, f"arguments must be an object, not {type(arguments).__name__}")
        result = call_in_session(self.executor, session, name, arguments)
        images = [{"type": "image", "data": png, "mimeType": "image/png"} for png in result.images]
        return {"content": [{"type": "text", "text": result.content}, *images], "isError": not result.ok}


def is_message(message: Any) -> bool:
    return isinstance(message, dict) and message.get("jsonrpc") == "2.0" and isinstance(message.get("method"), str)


def rpc_error(request_id: Any, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
