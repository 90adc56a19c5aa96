"""The room-selection environment: pick the meeting room that fits a request, or answer ``No Room``.

Task sets (``load_tasks``): ``public`` (the 40 packaged requests), ``public:train`` (first 28),
``public:val`` (last 12), ``generated:n=200,seed=7`` (solver-labelled random requests), or a ``.jsonl`` path.
``generated:n=200,seed=7,catalogs=random`` gives every request a random catalog of its own (``catalogs=K``: K
catalogs shared round-robin), carried in the task row; prompts, tools, grading and the trivial policies read
each task's own catalog (:mod:`.catalog_generator`).
Agent modes: ``tool`` (the seed's tool-calling agent), ``inline`` (room checks written into the prompt, for
small models), ``teacher`` (the inline request answered by the solver through the gateway: demonstrations for
the warm start), ``tool_teacher`` (the tool conversation with the tool call and the solver's answer given: tool
demonstrations), ``solver`` (no model; the reference agent).

Options (``env.options`` in a recipe): ``catalog`` (a catalog file; the packaged seven rooms by default),
``room_lines`` (``full``, ``brief`` or ``verdict_first``: how the inline prompt writes each room's checks, see
:mod:`.prompts`, and how the ``checks`` tool writes its verdicts), ``tool_result`` (``full``, ``brief`` or
``checks``: which tool the tool agents call and what it returns for each room, see :mod:`.tools`; ``checks`` is a
search that takes the whole request and returns each room's verdict), ``tool_content`` (``json``, the default, or
``lines``: the ``checks`` tool's result written one room per line, as the inline prompt writes them, see
:data:`.tools.TOOL_CONTENTS`) and ``answer_style`` (``choice``, ``passing`` or ``stepwise``: one ``final_choice``
line, the rooms that pass copied first, or those narrowed one tie-break at a time after them, see :mod:`.prompts`).
"""

from __future__ import annotations

from pathlib import Path

from rltrain.agent import Agent
from rltrain.envs.room_selection.agent import AGENT_MODES, GRADE_SPAN, catalog_for, check_options, make_agent
from rltrain.envs.room_selection.catalog import Catalog, load_catalog, reference_catalog_path
from rltrain.envs.room_selection.prompts import (
    PROMPT_FORMS,
    AnswerStyle,
    RoomLines,
    default_prompts,
)
from rltrain.envs.room_selection.schema import NO_ROOM
from rltrain.envs.room_selection.solver import check_rooms
from rltrain.envs.room_selection.tasks import request_of, resolve_tasks
from rltrain.envs.room_selection.tools import ToolContent, ToolResult
from rltrain.types import PromptTemplate, Span, SpanKind, Task


class RoomSelectionEnv:
    """The environment for one catalog: ``"reference"`` (the packaged seven rooms) or a catalog file path."""

    name = "room_selection"

    def __init__(
        self,
        catalog: str | Path = "reference",
        room_lines: RoomLines = "full",
        tool_result: ToolResult = "full",
        answer_style: AnswerStyle = "choice",
        tool_content: ToolContent = "json",
    ) -> None:
        check_options(room_lines, tool_result, answer_style, tool_content)
        path = reference_catalog_path() if str(catalog) == "reference" else Path(catalog)
        self.catalog_path = path
        self.catalog: Catalog = load_catalog(path)
        self.room_lines: RoomLines = room_lines
        self.tool_result: ToolResult = tool_result
        self.answer_style: AnswerStyle = answer_style
        self.tool_content: ToolContent = tool_content
        self._agents: dict[str, Agent] = {}

    def load_tasks(self, spec: str) -> list[Task]:
        return resolve_tasks(spec, self.catalog)

    def agent(self, mode: str) -> Agent:
        if mode not in self._agents:
            self._agents[mode] = make_agent(
                mode, self.catalog, room_lines=self.room_lines, tool_result=self.tool_result,
                answer_style=self.answer_style, tool_content=self.tool_content,
            )
        return self._agents[mode]

    def reference_agent(self) -> Agent:
        return self.agent("solver")

    def default_prompts(self, mode: str) -> dict[str, PromptTemplate]:
        """The mode's templates; the solver reads none."""
        if mode not in AGENT_MODES:
            raise ValueError(
                f"unknown room-selection agent mode {mode!r}; expected one of {list(AGENT_MODES)}"
            )
        return default_prompts(mode, self.tool_result, self.answer_style) if mode in PROMPT_FORMS else {}

    def answer_space(self) -> list[str]:
        """The environment catalog's answers; a task carrying its own catalog is graded against that one's."""
        return self.catalog.answer_space()

    def answer_of(self, spans: list[Span]) -> str | None:
        """The answer of the last ``grade`` span (``None`` when unparseable or never graded): the chosen room, or
        for a task with its own catalog its place in that catalog (see :mod:`.agent`). Spans recorded before
        ``answer`` existed give their ``choice``."""
        for span in reversed(spans):
            if span.kind == SpanKind.LOG and span.name == GRADE_SPAN:
                return span.attributes.get("answer", span.attributes.get("choice"))
        return None

    def reference_policies(self, tasks: list[Task]) -> dict[str, float]:
        """Accuracy of the trivial policies CALIBRATION.md compares every rung with, on ``tasks``: always
        ``No Room``; a random room that passes the hard constraints (its expected accuracy: 1/k when the
        answer is one of k feasible rooms; ``No Room`` when none passes); the first feasible room in catalog
        order. A model below the random-feasible policy has not learnt the tie-breaks."""
        if not tasks:
            return {}
        no_room = random_feasible = first_feasible = 0.0
        for task in tasks:
            expected = task.payload["expected_choice"]
            request = request_of(task.payload)
            catalog = catalog_for(task.payload, self.catalog)
            passing = [c.room.id for c in check_rooms(request, catalog) if c.passes]
            no_room += expected == NO_ROOM
            if not passing:
                random_feasible += expected == NO_ROOM
                first_feasible += expected == NO_ROOM
            else:
                random_feasible += (expected in passing) / len(passing)
                first_feasible += expected == passing[0]
        n = len(tasks)
        return {"always No Room": no_room / n, "random feasible room": random_feasible / n,
                "first feasible room": first_feasible / n}

    def __repr__(self) -> str:
        return (
            f"RoomSelectionEnv(catalog={str(self.catalog_path)!r}, room_lines={self.room_lines!r}, "
            f"tool_result={self.tool_result!r}, answer_style={self.answer_style!r}, "
            f"tool_content={self.tool_content!r})"
        )


__all__ = ["RoomSelectionEnv"]
