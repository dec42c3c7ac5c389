"""The engine on its own thread, serving many asyncio callers at once.

One thread owns the engine: it builds it (loads the weights, allocates the KV cache) and steps it
while there is work. Keeping all torch work on one thread matters on CPU: OpenMP keeps a thread
team per calling thread, and once the teams together hold more threads than there are CPUs,
libgomp stops spinning at its barriers and puts its threads to sleep at each of the hundreds of
parallel regions in a step. A model loaded on the caller's thread and stepped on this one did
exactly that: decode steps took 1.6x as long (median 51 vs 32 ms, SmolLM2, bf16, 2 CPUs).

Callers talk to the engine thread through a thread-safe inbox (new requests, aborts) and get
their outputs on per-request asyncio queues. A caller that stops listening (the HTTP client
disconnected, Serve cancelled the call) aborts its request on the way out, which frees its
sequence and KV blocks before the next step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import traceback
from typing import AsyncIterator

from internray.runtime import raise_thread_priority
from internray.serve.config import EngineConfig
from internray.serve.engine.llm_engine import LLMEngine, RequestOutput
from internray.serve.engine.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, **engine_kwargs):
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._failure: BaseException | None = None
        self._idle_calls: list = []  # (fn, reply) waiting for the engine to have no request running
        self.engine: LLMEngine  # set by the engine thread
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(built, config, engine_kwargs), name="internray-engine",
                                        daemon=True)
        self._thread.start()
        built.result()  # re-raises what stopped the build (bad checkpoint, too little memory)
        self.tokenizer = self.engine.tokenizer

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they happen; the last has `finished` set."""
        if self._failure is not None:
            raise RuntimeError(f"the engine stopped: {self._failure!r}")
        loop, outputs = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[request_id] = (loop, outputs)
        reply = loop.create_future()
        self._inbox.put(("add", request_id, prompt_token_ids, params, reply))
        finished = False
        try:
            await reply  # raises InvalidRequest here, before any output
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    raise RuntimeError(f"the engine failed: {out!r}") from out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def call_when_idle(self, fn):
        """Run `fn(engine)` on the engine thread once no request is running, and return its result
        (the align stage swaps a rollout engine's weights this way, between batches)."""
        reply = asyncio.get_running_loop().create_future()
        self._inbox.put(("call", fn, reply))
        return await reply

    def _run(self, built: concurrent.futures.Future, config: EngineConfig, engine_kwargs: dict) -> None:
        raise_thread_priority("the engine thread")
        try:
            self.engine = LLMEngine(config, **engine_kwargs)
        except BaseException as e:
            built.set_exception(e)
            return
        built.set_result(None)
        self._loop()

    def _loop(self) -> None:
        try:
            while True:
                self._drain_inbox(block=not self.engine.has_work and not self._idle_calls)
                while self._idle_calls and not self.engine.has_work:
                    fn, reply = self._idle_calls.pop(0)
                    try:
                        result, error = fn(self.engine), None
                    except Exception as e:
                        result, error = None, e
                    reply.get_loop().call_soon_threadsafe(_resolve, reply, error, result)
                for out in self.engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # surface to every waiting caller instead of hanging them
            traceback.print_exc()
            self._failure = e
            for request_id in list(self._streams):
                self._deliver(request_id, e)

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                self._handle(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _handle(self, item) -> None:
        if item[0] == "abort":
            self.engine.abort(item[1])
            return
        if item[0] == "call":
            self._idle_calls.append(item[1:])
            return
        _, request_id, prompt, params, reply = item
        loop = reply.get_loop()
        try:
            self.engine.add_request(request_id, prompt, params)
            loop.call_soon_threadsafe(_resolve, reply, None)
        except Exception as e:
            loop.call_soon_threadsafe(_resolve, reply, e)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def status(self) -> dict:
        """Point-in-time numbers for /metrics (read without locking: each is a single attribute)."""
        e = self.engine
        return {"running": len(e.scheduler.running), "waiting": len(e.scheduler.waiting),
                "kv_usage": e.blocks.usage, "num_blocks": e.blocks.num_blocks,
                "prefix_hit_rate": e.blocks.hit_blocks / max(e.blocks.queried_blocks, 1),
                "preemptions": e.scheduler.num_preemptions}


def _resolve(future: asyncio.Future, error: Exception | None, result=None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
