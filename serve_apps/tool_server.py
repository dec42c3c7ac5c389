"""The tool server (`internray/agent/server.py`) as a Ray Serve application, for `serve run` /
`serve deploy` / a KubeRay RayService:

    serve run serve_apps/tool_server.yaml
    serve run serve_apps.tool_server:app_builder tools='{"enabled": ["calculator"]}'

`args` are `tools` (a ToolsSection) and `executor` (an ExecutorSection), as in an agent config;
unknown keys are refused before anything starts.
"""
import asyncio

from pydantic import Field
from ray import serve

from internray.agent.config import ExecutorSection, ToolsSection
from internray.agent.executor import ToolExecutor
from internray.agent.server import MAX_UPLOAD_BYTES, build_tool_app
from internray.config import Section, validate_config


class ToolServerArgs(Section):
    tools: ToolsSection = Field(default_factory=ToolsSection)
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    max_upload_mb: float = Field(MAX_UPLOAD_BYTES / 2**20, gt=0, description="per upload request")


@serve.deployment(num_replicas=1, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.1})
@serve.ingress()
class ToolServer:
    """The HTTP front of one tool pool, which this replica owns (the pool's actors end with it).

    One replica: a session's state (an interpreter's variables) lives in the replica's pool, so a
    second replica would split sessions between pools. The front only waits on the pool, so scale
    the pool (`executor.num_workers`, `max_concurrency`) rather than the replicas."""

    async def __init__(self, args: dict):
        self.args = ToolServerArgs.model_validate(args)
        self.executor = ToolExecutor(self.args.tools, self.args.executor)
        await asyncio.to_thread(self.executor.schemas)  # a tool that fails to import fails the deploy

    def __serve_build_asgi_app__(self):
        return build_tool_app(self.executor, int(self.args.max_upload_mb * 2**20))


def app_builder(args: dict):
    config = validate_config(ToolServerArgs, dict(args), source="tool server application args")
    return ToolServer.bind(config.model_dump(mode="json"))
