"""Python for the model: a persistent interpreter per conversation, and data analysis on tables.

Both run code in `internray.sandbox_session.PythonSession`: a confined child process whose working
directory is the conversation's own, with time, memory and output limits, no network, and no
access to files outside that directory (see `internray.sandbox`). Variables survive between
calls like cells of a notebook, and the two tools share one session, so a table loaded for
analysis is still there for the interpreter. Figures left open by a cell come back as PNGs.
"""
from __future__ import annotations

import json
from pathlib import Path

from internray.agent.tools.base import Tool, ToolContext, ToolError, ToolOutput
from internray.sandbox import SandboxLimits
from internray.sandbox_session import CellResult, PythonSession

_SESSION_KEY = "python_session"


class PythonInterpreter(Tool):
    name = "python"
    stateful = True

    def __init__(self, limits: SandboxLimits = SandboxLimits()):
        self.limits = limits

    def session(self, context: ToolContext) -> PythonSession:
        if _SESSION_KEY not in context.state:
            context.state[_SESSION_KEY] = PythonSession(context.workdir, self.limits)
        return context.state[_SESSION_KEY]

    def close_session(self, context: ToolContext) -> None:
        session = context.state.pop(_SESSION_KEY, None)
        if session is not None:
            session.close()

    def run(self, context: ToolContext, code: str) -> ToolOutput:
        """Run Python code in a persistent session (variables survive between calls). The value of
        the last line is shown; print what else you need. matplotlib figures are returned as images.

        Args:
            code: Python source to execute
        """
        return self.execute(context, code)

    def execute(self, context: ToolContext, code: str) -> ToolOutput:
        result = self.session(context).run(code)
        if result.status != "ok":
            raise ToolError(_failure(result))
        images = [Path(context.workdir, p).read_bytes() for p in result.images]
        text = result.output.strip() or "(no output)"
        if result.images:
            text += "\n" + "\n".join(f"[image: {p}]" for p in result.images)
        return ToolOutput(text, images)


class DataAnalysis(PythonInterpreter):
    name = "data_analysis"

    def run(self, context: ToolContext, table: str, code: str) -> ToolOutput:
        """Analyse a CSV or JSON table with pandas: the table is loaded as `df`, then `code` runs
        (pandas is `pd`, matplotlib.pyplot is `plt`). Draw with plt to get a PNG chart back.

        Args:
            table: file name of the table in the conversation's files (.csv, .json or .jsonl)
            code: Python using `df`, e.g. "df.groupby('city')['sales'].sum().plot.bar()"
        """
        path = (context.workdir / table).resolve()
        if not path.is_relative_to(context.workdir.resolve()) or not path.is_file():
            available = sorted(p.name for p in context.workdir.iterdir() if p.suffix in (".csv", ".json", ".jsonl"))
            raise ToolError(f"no table {table!r} in this conversation's files (available: {available or 'none'})")
        reader = {".csv": "pd.read_csv({0})", ".json": "pd.read_json({0})",
                  ".jsonl": "pd.read_json({0}, lines=True)"}.get(path.suffix)
        if reader is None:
            raise ToolError(f"{table!r}: only .csv, .json and .jsonl tables can be loaded")
        load = ("import pandas as pd\nimport matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                f"df = {reader.format(json.dumps(path.name))}\n")
        return self.execute(context, load + code)


def _failure(result: CellResult) -> str:
    output = result.output.strip()
    return result.error + (f"\noutput before the failure:\n{output[-2000:]}" if output else "")
