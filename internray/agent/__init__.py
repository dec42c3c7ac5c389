"""The agent stage: models that use tools (Lagent-style agents, AgentLego-style tools on Ray actors).

    config.py    AgentConfig: llm, agent, tools, executor, tasks
    llm.py       the model: any OpenAI-compatible endpoint, or a local HF checkpoint
    agents.py    FunctionCallingAgent, ReActAgent, and the Trace they record
    tools/       Tool (schema from a typed signature) and the builtin tools
    executor.py  the tools' pool of Ray actors, with per-conversation sessions
    runner.py    batch mode: a JSONL of tasks in parallel -> traces, results, summary
    server.py    the pool over HTTP and MCP (serve_apps/tool_server.py); remote.py is its client
"""
