"""The room-selection environment: data, solver, generator, grader, tools, prompts and agents.

The chat agents are run against a scripted OpenAI-compatible HTTP endpoint (a few canned replies, the
requests recorded) so that their message handling is tested without a model or the gateway.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rltrain.agent import Agent, RolloutContext
from rltrain.envs import EnvironmentOptionsError, UnknownEnvironmentError, get_env
from rltrain.envs.base import Environment
from rltrain.envs.room_selection import RoomSelectionEnv
from rltrain.envs.room_selection.agent import CONTINUE_ANSWER, make_agent, room_selector_solver
from rltrain.envs.room_selection.catalog import (
    Catalog,
    CatalogError,
    load_catalog,
    reference_catalog_path,
)
from rltrain.envs.room_selection.catalog_generator import (
    MAX_ROOMS,
    MIN_ROOMS,
    ROOM_NAMES,
    generate_catalog,
    generate_catalogs,
)
from rltrain.envs.room_selection.generator import MAX_LABEL_SHARE, generate_tasks
from rltrain.envs.room_selection.prompts import default_prompts, prompt_values, teacher_answer
from rltrain.envs.room_selection.schema import NO_ROOM, overlaps
from rltrain.envs.room_selection.solver import check_rooms, feasible_rooms, grade, solve
from rltrain.envs.room_selection.tasks import (
    MAX_ROW_BYTES,
    PUBLIC_TASKS_PATH,
    RoomRequest,
    TaskSpecError,
    load_tasks,
    request_of,
    resolve_tasks,
    write_tasks,
)
from rltrain.envs.room_selection.tools import (
    TOOL_DEFINITIONS,
    TOOL_NAME,
    ToolCallError,
    execute_tool_call,
    parse_tool_call,
    tool_definitions,
)
from rltrain.escalation import LadderResult, RungResult
from rltrain.metrics import EvalSummary, summarise
from rltrain.report import render_markdown
from rltrain.store.memory import MemoryStore
from rltrain.types import LLMResource, PromptTemplate, Resources, Rollout, SamplingParams, SpanKind, Task

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOOD_ARGS = json.dumps({"date": "2025-10-13", "time": "14:30", "duration_min": 30})


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(reference_catalog_path())


@pytest.fixture(scope="module")
def env() -> RoomSelectionEnv:
    return RoomSelectionEnv()


@pytest.fixture(scope="module")
def public(env: RoomSelectionEnv) -> list[Task]:
    return env.load_tasks("public")


def _request(**changes: Any) -> RoomRequest:
    fields = {
        "date": "2025-10-13",
        "time": "14:30",
        "duration_min": 30,
        "attendees": 12,
        "needs": ["whiteboard", "confphone"],
        "accessible_required": True,
    }
    return RoomRequest(**{**fields, **changes})


def _row(task_id: str = "t1", **changes: Any) -> dict[str, Any]:
    return {"id": task_id, "task_input": _request().model_dump(), "expected_choice": "Nova", **changes}


def _resources(mode: str, base_url: str = "http://127.0.0.1:9/v1", **prompts: PromptTemplate) -> Resources:
    return Resources(
        llm=LLMResource(
            base_url=base_url, model="policy", sampling=SamplingParams(temperature=0.7, max_tokens=20, seed=3)
        ),
        prompts={**default_prompts(mode), **prompts} if mode != "solver" else {},
    )


def _run_in_rollout(agent: Agent, task: Task, resources: Resources) -> tuple[float | None, list[Any]]:
    """Run the agent as the runner does (Agent.run under a RolloutContext) and return its reward and spans."""
    store = MemoryStore()
    store.enqueue_rollouts([Rollout(task=task)])
    claimed = store.claim_rollout("worker-0")
    assert claimed is not None
    rollout, attempt = claimed
    ctx = RolloutContext(rollout_id=rollout.rollout_id, attempt_no=attempt.attempt_no, store=store)
    reward = asyncio.run(agent.run(task.payload, resources, ctx))
    return reward, store.get_spans(rollout.rollout_id)


# -- data and solver -------------------------------------------------------------------------------------


def test_solver_reproduces_every_public_label(public: list[Task], catalog: Catalog) -> None:
    assert len(public) == 40
    assert [solve(request_of(t.payload), catalog) for t in public] == [
        t.payload["expected_choice"] for t in public
    ]


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no shared reference data beside this checkout")
@pytest.mark.parametrize("name", ["room_catalog_7.json", "room_tasks_public.jsonl"])
def test_packaged_data_is_the_shared_reference_data(name: str) -> None:
    packaged = reference_catalog_path().parent / name
    assert packaged.read_bytes() == (SHARED_DATA / name).read_bytes()


def test_task_payload_is_the_row_as_read(public: list[Task]) -> None:
    first = json.loads(PUBLIC_TASKS_PATH.read_text().splitlines()[0])
    assert public[0].id == first["id"] == "s01"
    assert public[0].payload == first


@pytest.mark.parametrize(
    ("start", "duration", "free"),
    [
        ("09:30", 30, True),
        ("10:00", 30, False),
        ("10:30", 30, False),
        ("11:00", 30, True),
        ("09:00", 61, False),
    ],
)
def test_bookings_are_half_open_intervals(catalog: Catalog, start: str, duration: int, free: bool) -> None:
    orion = catalog.rooms[0]  # booked 10:00-11:00 and 15:00-15:30 on 2025-10-13
    assert orion.is_free("2025-10-13", start, duration) is free
    assert orion.is_free("2025-10-14", start, duration)


@given(st.integers(0, 23 * 60), st.integers(1, 120), st.integers(0, 23 * 60), st.integers(1, 120))
def test_overlap_agrees_with_minute_sets(a: int, da: int, b: int, db: int) -> None:
    def clock(minutes: int) -> str:
        return f"{minutes // 60:02d}:{minutes % 60:02d}"

    shared = set(range(a, a + da)) & set(range(b, b + db))
    assert overlaps(clock(a), da, clock(b), db) is bool(shared)


def test_tie_breaks_apply_in_order(catalog: Catalog) -> None:
    # 3 people, whiteboard: Orion (slack 1) beats Atlas/Pulse/... (slack >= 3).
    assert solve(_request(attendees=3, needs=["whiteboard"], accessible_required=False), catalog) == "Orion"
    # 6 people, projector: Atlas (6 seats) fits exactly; Quark and Lyra have seats to spare.
    assert solve(_request(attendees=6, needs=["projector"], accessible_required=False), catalog) == "Atlas"
    # 8 people, whiteboard: Quark (2 items, 18 m) and Pulse (3 items, 8 m): fewer extra items beats distance.
    assert solve(_request(attendees=8, needs=["whiteboard"], accessible_required=False), catalog) == "Quark"
    # No room has a ledwall and a projector.
    assert solve(_request(attendees=2, needs=["ledwall", "projector"]), catalog) == NO_ROOM


def test_bookings_that_day_then_catalog_order_break_the_last_ties() -> None:
    def room(room_id: str, bookings: list[str]) -> dict[str, Any]:
        booked = [{"date": "2025-10-13", "time": time, "duration_min": 30} for time in bookings]
        return {
            "id": room_id,
            "capacity": 4,
            "equipment": ["tv"],
            "accessible": True,
            "distance_m": 5,
            "booked": booked,
        }

    busy, quiet, twin = room("Busy", ["08:00", "09:00"]), room("Quiet", ["08:00"]), room("Twin", ["09:00"])
    request = _request(attendees=4, needs=["tv"])
    assert solve(request, Catalog.model_validate({"rooms": [busy, quiet]})) == "Quiet"
    assert solve(request, Catalog.model_validate({"rooms": [busy, twin, quiet]})) == "Twin"
    assert solve(request, Catalog.model_validate({"rooms": [busy, quiet, twin]})) == "Quiet"


def test_feasible_rooms_are_ranked_best_first(catalog: Catalog) -> None:
    request = _request(attendees=2, needs=["whiteboard"], accessible_required=True)
    ranked = [room.id for room in feasible_rooms(request, catalog)]
    assert ranked[0] == solve(request, catalog) == "Orion"
    assert set(ranked) == {c.room.id for c in check_rooms(request, catalog) if c.passes}
    assert "Quark" not in ranked  # not accessible


# -- catalog and task files --------------------------------------------------------------------------------


def _write_catalog(tmp_path: Path, edit: Any) -> Path:
    data = json.loads(reference_catalog_path().read_text())
    edit(data)
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda d: d["rooms"][2].update(capacity=-1), ["rooms.2.capacity", "-1"]),
        (
            lambda d: d["rooms"][0]["booked"][1].update(time="3pm"),
            ["rooms.0.booked.1.time", "HH:MM", "'3pm'"],
        ),
        (lambda d: d["rooms"][1].update(id="Orion"), ["rooms", "'Orion'", "more than once"]),
        (lambda d: d["rooms"][3].update(accessible="yes"), ["rooms.3.accessible", "'yes'"]),
        (lambda d: d["rooms"][4].update(colour="red"), ["rooms.4.colour", "red"]),
        (lambda d: d["rooms"][5].pop("distance_m"), ["rooms.5.distance_m", "missing"]),
    ],
)
def test_catalog_errors_name_file_field_and_value(tmp_path: Path, edit: Any, fragments: list[str]) -> None:
    path = _write_catalog(tmp_path, edit)
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    for fragment in [str(path), *fragments]:
        assert fragment in str(info.value)


def test_catalog_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="cannot read catalog file"):
        load_catalog(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text('{"rooms": [')
    with pytest.raises(CatalogError, match=r"broken.json: not valid JSON at line 1"):
        load_catalog(tmp_path / "broken.json")


@pytest.mark.parametrize(
    ("second_line", "fragments"),
    [
        ('{"id": "t2", "task_input": ', ["not valid JSON"]),
        ('["t2"]', ["expected a JSON object", "list"]),
        ('{"id": "t2", "expected_choice": "Nova"}', ["task_input", "missing"]),
        (
            json.dumps(_row("t2", task_input={**_request().model_dump(), "attendees": "12"})),
            ["task_input.attendees", "'12'"],
        ),
        (
            json.dumps(_row("t2", task_input={**_request().model_dump(), "time": "2:30"})),
            ["task_input.time", "HH:MM", "'2:30'"],
        ),
        (
            json.dumps(_row("t2", task_input={**_request().model_dump(), "needs": "tv"})),
            ["task_input.needs", "'tv'"],
        ),
        (
            json.dumps(_row("t2", task_input={**_request().model_dump(), "duration_min": 0})),
            ["task_input.duration_min", "0"],
        ),
        (json.dumps(_row("t2", expected_choice=3)), ["expected_choice", "3"]),
        (json.dumps(_row("t2", note="x")), ["note", "'x'"]),
        (json.dumps(_row("t1")), ["id 't1' already used on line 1"]),
        (json.dumps(_row("t2", expected_choice="Narnia")), ["expected_choice 'Narnia'", "No Room"]),
        (json.dumps(_row("t2", catalog={"rooms": []})), ["catalog.rooms", "at least 1 item"]),
        (
            json.dumps(_row("t2", catalog=generate_catalog("c").model_dump())),
            ["expected_choice 'Nova' is not an answer of the row's own catalog"],
        ),
        (
            json.dumps(_row("t2", catalog=generate_catalog("c").model_dump(), catalog_path="c.json")),
            ["'catalog' or 'catalog_path', not both"],
        ),
    ],
)
def test_malformed_task_rows_name_file_line_field_and_value(
    tmp_path: Path, catalog: Catalog, second_line: str, fragments: list[str]
) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(_row("t1")) + "\n\n" + second_line + "\n")
    with pytest.raises(TaskSpecError) as info:
        load_tasks(path, answers=catalog.answer_space())
    for fragment in [f"{path}:3", *fragments]:
        assert fragment in str(info.value)


def test_write_tasks_refuses_invalid_rows(tmp_path: Path) -> None:
    with pytest.raises(TaskSpecError, match=r"row 1 \('t2'\): task_input.attendees"):
        write_tasks(
            tmp_path / "x.jsonl",
            [_row("t1"), _row("t2", task_input={**_request().model_dump(), "attendees": 0})],
        )
    assert not (tmp_path / "x.jsonl").exists()


# -- generated tasks and task specs ------------------------------------------------------------------------


def test_generated_tasks_round_trip_and_keep_their_labels(tmp_path: Path, catalog: Catalog) -> None:
    rows = generate_tasks(catalog, 60, seed=7)
    assert [row["id"] for row in rows] == [f"g7-{i}" for i in range(60)]
    loaded = load_tasks(write_tasks(tmp_path / "gen" / "tasks.jsonl", rows), answers=catalog.answer_space())
    assert [task.payload for task in loaded] == rows
    for task in loaded:
        request = request_of(task.payload)
        assert request.date in catalog.booking_dates
        assert "08:00" <= request.time <= "18:00" and request.time[3:] in ("00", "30")
        assert request.duration_min in (30, 60, 90, 120) and 1 <= request.attendees <= 14
        assert set(request.needs) <= set(catalog.equipment)
        assert solve(request, catalog) == task.payload["expected_choice"]


def test_generation_is_deterministic_per_seed(catalog: Catalog) -> None:
    def inputs(seed: int) -> list[dict[str, Any]]:
        return [row["task_input"] for row in generate_tasks(catalog, 30, seed)]

    assert inputs(7) == inputs(7)
    assert inputs(7) != inputs(8)


def test_generated_labels_are_not_dominated_by_one_answer(catalog: Catalog) -> None:
    labels = Counter(row["expected_choice"] for row in generate_tasks(catalog, 200, seed=1))
    assert max(labels.values()) <= (MAX_LABEL_SHARE + 0.01) * 200
    assert labels[NO_ROOM] > 0 and len(labels) >= 6


def test_excluded_requests_are_never_generated(catalog: Catalog) -> None:
    rows = generate_tasks(catalog, 50, seed=4)
    excluded = [row["task_input"] for row in rows[::2]]
    # Needs in another order are the same request.
    excluded[0] = {**excluded[0], "needs": excluded[0]["needs"][::-1]}
    again = [row["task_input"] for row in generate_tasks(catalog, 50, seed=4, exclude=excluded)]
    assert not [request for request in again if request in [row["task_input"] for row in rows[::2]]]
    assert rows[1]["task_input"] in again


def test_resolve_public_splits(catalog: Catalog) -> None:
    train, val = resolve_tasks("public:train", catalog), resolve_tasks("public:val", catalog)
    assert (len(train), len(val)) == (28, 12)
    assert [t.id for t in train + val] == [t.id for t in resolve_tasks("public", catalog)]


def test_resolve_a_task_file(tmp_path: Path, catalog: Catalog) -> None:
    path = write_tasks(tmp_path / "mine.jsonl", [_row("a"), _row("b")])
    assert [t.id for t in resolve_tasks(str(path), catalog)] == ["a", "b"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("public:test", "unknown public split in 'public:test'"),
        ("generated:seed=3", "needs n=<count>"),
        ("generated:n=ten", "n must be an integer, got 'ten'"),
        ("generated:n=5,size=3", "unknown option 'size=3'"),
        ("generated:n=5,catalogs=foo", ("catalogs must be 'random' (a catalog per task) or a count of catalogs "
                                        "from 1 to n=5, got 'foo'")),
        ("generated:n=5,catalogs=0", "catalogs must be 'random'"),
        ("generated:n=5,catalogs=6", "from 1 to n=5, got '6'"),
        ("tasks.csv", "unknown task set 'tasks.csv'"),
        ("absent.jsonl", "cannot read task file absent.jsonl"),
    ],
)
def test_bad_task_specs_say_what_is_accepted(catalog: Catalog, spec: str, message: str) -> None:
    with pytest.raises(TaskSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_tasks(spec, catalog)


def test_public_tasks_need_the_reference_catalog(tmp_path: Path) -> None:
    other = load_catalog(_write_catalog(tmp_path, lambda d: d["rooms"][0].update(capacity=5)))
    with pytest.raises(TaskSpecError, match="labelled against the reference catalog"):
        resolve_tasks("public:val", other)


# -- grading -----------------------------------------------------------------------------------------------

ROOMS = ["Orion", "Lyra", "Vega", "Nova", "Quark", "Atlas", "Pulse"]


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ("final_choice: Orion", "Orion"),
        ("final_choice: orion\nreason: smallest slack", "Orion"),
        ("Final answer: No Room", NO_ROOM),
        ("final_choice: no room", NO_ROOM),
        ("**Final Choice:** `Pulse`.", "Pulse"),
        ("final_choice:\nLyra", "Lyra"),
        ("final_choice: Orion\nOn reflection...\nfinal_choice: Lyra", "Lyra"),
        ("final_choice: Orion (Lyra is busy)", "Orion"),
        ("The best room is Atlas because it is closest.", "Atlas"),
        ("Atlas. Atlas is free.", "Atlas"),
        ("Atlas or Pulse would do.", None),
        ("final_choice: <ROOM_ID or No Room>", None),
        ("final_choice: <ROOM_ID or No Room>\nfinal_choice: Vega", "Vega"),
        ("final_choice: Mars", None),
        ("I cannot decide.", None),
        ("", None),
        ("NovaX and Orionids", None),
    ],
)
def test_grade_parses_the_choice(text: str, choice: str | None) -> None:
    result = grade(text, "Lyra", ROOMS)
    assert (result.choice, result.parseable) == (choice, choice is not None)
    assert result.correct is (choice == "Lyra")
    assert result.reward == (1.0 if choice == "Lyra" else 0.0)


def test_grade_without_room_ids_still_knows_the_expected_answer_and_no_room() -> None:
    assert grade("final_choice: lyra", "Lyra").correct
    assert grade("final_choice: No Room", "Lyra").choice == NO_ROOM
    assert grade("final_choice: Orion", "Lyra").choice is None


# -- the tool ----------------------------------------------------------------------------------------------


def test_tool_schema_matches_the_argument_model() -> None:
    parameters = TOOL_DEFINITIONS[0]["function"]["parameters"]
    assert TOOL_DEFINITIONS[0]["function"]["name"] == TOOL_NAME
    assert parameters["required"] == ["date", "time", "duration_min"]
    assert {name: prop["type"] for name, prop in parameters["properties"].items()} == {
        "date": "string",
        "time": "string",
        "duration_min": "integer",
    }


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("get_rooms", GOOD_ARGS, "unknown tool 'get_rooms'"),
        (TOOL_NAME, '{"date": "2025-10-13", ', "not valid JSON"),
        (TOOL_NAME, '["2025-10-13"]', "must be a JSON object, got list"),
        (TOOL_NAME, '{"date": "2025-10-13", "time": "14:30"}', "duration_min: required field is missing"),
        (
            TOOL_NAME,
            '{"date": "13/10/2025", "time": "14:30", "duration_min": 30}',
            "date: expected a calendar date",
        ),
        (
            TOOL_NAME,
            '{"date": "2025-10-13", "time": "14:30", "duration_min": "30"}',
            "duration_min: Input should be",
        ),
        (
            TOOL_NAME,
            '{"date": "2025-10-13", "time": "14:30", "duration_min": -5}',
            "duration_min: Input should be",
        ),
        (
            TOOL_NAME,
            '{"date": "2025-10-13", "time": "14:30", "duration_min": 30, "room": "Nova"}',
            "room: Extra",
        ),
    ],
)
def test_bad_tool_calls_become_error_results(
    catalog: Catalog, name: str, arguments: str, message: str
) -> None:
    with pytest.raises(ToolCallError, match=message):
        parse_tool_call(name, arguments)
    result = execute_tool_call(name, arguments, catalog)
    assert list(result) == ["error"] and message in result["error"]


def test_tool_reports_each_room_free_or_not(catalog: Catalog) -> None:
    result = execute_tool_call(TOOL_NAME, GOOD_ARGS, catalog)
    free = {room["id"]: room["free"] for room in result["rooms"]}
    assert free == {room.id: room.is_free("2025-10-13", "14:30", 30) for room in catalog.rooms}
    assert free["Vega"] is False and free["Nova"] is True  # Vega is booked 14:00-15:00
    json.dumps(result)  # what the agent sends back as the tool message


def test_brief_tool_result_keeps_what_the_checks_read(catalog: Catalog) -> None:
    """``tool_result: brief`` (an environment option) drops the booking lists but keeps every field the checks
    and tie-breaks read, with the bookings of the queried day counted; the full result stays the default."""
    full = execute_tool_call(TOOL_NAME, GOOD_ARGS, catalog)["rooms"]
    brief = execute_tool_call(TOOL_NAME, GOOD_ARGS, catalog, "brief")["rooms"]
    assert len(json.dumps(brief)) < len(json.dumps(full)) * 0.7
    for room, full_room, brief_room in zip(catalog.rooms, full, brief, strict=True):
        assert "booked" in full_room and "booked" not in brief_room
        assert brief_room["bookings_that_day"] == room.bookings_on("2025-10-13")
        assert {k: v for k, v in full_room.items() if k != "booked"} == {
            k: v for k, v in brief_room.items() if k != "bookings_that_day"
        }
    env = get_env("room_selection", tool_result="brief")
    assert env.tool_result == "brief" and "tool_result='brief'" in repr(env)
    with pytest.raises(ValueError, match="tool_result must be one of"):
        get_env("room_selection", tool_result="short")


# -- prompts -----------------------------------------------------------------------------------------------


def test_inline_prompt_shows_every_rooms_checks(catalog: Catalog, public: list[Task]) -> None:
    for task in public:
        request = request_of(task.payload)
        rooms_text = prompt_values("inline", request, catalog)["rooms"]
        lines = rooms_text.splitlines()
        assert [line.split(":")[0] for line in lines] == [f"- {room_id}" for room_id in catalog.room_ids]
        passing = {line.split(":")[0][2:] for line in lines if "PASSES" in line}
        assert passing == {room.id for room in feasible_rooms(request, catalog)}


def test_default_prompts_fill_from_prompt_values(catalog: Catalog) -> None:
    request = _request()
    for mode in ("tool", "inline"):
        values = prompt_values(mode, request, catalog)
        for template in default_prompts(mode).values():
            template.format(**values)
    assert "rooms" not in prompt_values("tool", request, catalog)  # finding them is the tool agent's job
    assert default_prompts("inline")["answer_prefix"].template == "final_choice:"
    with pytest.raises(ValueError, match="no default prompts for agent mode 'solver'"):
        default_prompts("solver")


# -- agents ------------------------------------------------------------------------------------------------


def test_solver_agent_scores_every_public_task(public: list[Task]) -> None:
    resources = _resources("solver")
    assert [room_selector_solver(task.payload, resources) for task in public] == [1.0] * 40


def test_agent_records_grade_and_reward_spans(env: RoomSelectionEnv, public: list[Task]) -> None:
    reward, spans = _run_in_rollout(env.reference_agent(), public[1], _resources("solver"))
    assert reward == 1.0
    grade_span = next(span for span in spans if span.name == "grade")
    assert grade_span.kind == SpanKind.LOG
    assert grade_span.attributes == {"choice": "Nova", "expected": "Nova", "correct": True, "parseable": True,
                                     "answer": "Nova"}
    assert [span.attributes["value"] for span in spans if span.kind == SpanKind.REWARD] == [1.0]
    assert env.answer_of(spans) == "Nova"
    assert env.answer_of([span for span in spans if span.name != "grade"]) is None


class ScriptedChat:
    """An OpenAI-compatible chat endpoint that answers with canned messages and records every request."""

    def __init__(self, replies: list[dict[str, Any]]) -> None:
        self.replies = list(replies)
        self.requests: list[dict[str, Any]] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server dispatches POST requests to
                script.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                message = {"role": "assistant", "content": None, **script.replies.pop(0)}
                body = json.dumps(
                    {
                        "id": f"chat-{len(script.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "policy",
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[ScriptedChat] = []

    def start(replies: list[dict[str, Any]]) -> ScriptedChat:
        chat = ScriptedChat(replies)
        threading.Thread(target=chat.server.serve_forever, daemon=True).start()
        servers.append(chat)
        return chat

    yield start
    for chat in servers:
        chat.server.shutdown()
        chat.server.server_close()


def _tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_tool_agent_survives_bad_calls_and_answers(
    scripted: Any, env: RoomSelectionEnv, public: list[Task]
) -> None:
    task = public[1]  # 2025-10-13 14:30, 30 min, 12 attendees, whiteboard + confphone, accessible: Nova
    chat = scripted(
        [
            {
                "tool_calls": [
                    _tool_call("c1", "book_room", "{}"),
                    _tool_call("c2", TOOL_NAME, '{"date": "today"}'),
                ]
            },
            {"content": "Let me look.", "tool_calls": [_tool_call("c3", TOOL_NAME, GOOD_ARGS)]},
            {"content": "final_choice: Nova\nreason: only room for 12"},
        ]
    )
    reward, spans = _run_in_rollout(env.agent("tool"), task, _resources("tool", chat.base_url))
    assert reward == 1.0
    first, _, last = chat.requests
    assert first["tools"] == TOOL_DEFINITIONS and first["model"] == "policy"
    assert (first["temperature"], first["max_tokens"], first["seed"]) == (0.7, 20, 3)
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert "12 attendees" in first["messages"][1]["content"]
    roles = [m["role"] for m in last["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "tool"]
    tool_results = [json.loads(m["content"]) for m in last["messages"] if m["role"] == "tool"]
    assert "unknown tool 'book_room'" in tool_results[0]["error"]
    assert "date: expected a calendar date" in tool_results[1]["error"]
    # the eval summary's tool columns: 1 of the 3 tool calls was valid; the llm spans are the gateway's (this
    # scripted endpoint records none), so the calls' count is filled in as the gateway would have recorded it
    summary = summarise("set", [], {"ro": spans}, {}, 0.0)
    assert (summary.tool_spans, summary.tool_errors, summary.valid_call_rate) == (3, 2, pytest.approx(1 / 3))
    summary = summary.model_copy(update={"llm_calls": 3, "tool_calls": 2})
    rung = RungResult(name="tool", summaries=[summary], agent_tokens=0, wall_s=1.0)
    assert "| tool | 67% / 33% |" in render_markdown(LadderResult(recipe="r", target=1.0, rungs=[rung]))
    assert {room["id"]: room["free"] for room in tool_results[2]["rooms"]}["Nova"] is True
    assert [m["tool_call_id"] for m in last["messages"] if m["role"] == "tool"] == ["c1", "c2", "c3"]
    tool_spans = [span for span in spans if span.kind == SpanKind.TOOL]
    assert [(span.name, span.attributes["error"] is None) for span in tool_spans] == [
        ("book_room", False),
        (TOOL_NAME, False),
        (TOOL_NAME, True),
    ]
    assert env.answer_of(spans) == "Nova"


def test_tool_agent_sends_the_brief_tool_result_when_the_env_says_so(scripted: Any, public: list[Task]) -> None:
    env = get_env("room_selection", tool_result="brief")
    chat = scripted([{"tool_calls": [_tool_call("c1", TOOL_NAME, GOOD_ARGS)]}, {"content": "final_choice: Nova"}])
    reward, _ = _run_in_rollout(env.agent("tool"), public[1], _resources("tool", chat.base_url))
    assert reward == 1.0
    (tool_message,) = [m for m in chat.requests[-1]["messages"] if m["role"] == "tool"]
    rooms = json.loads(tool_message["content"])["rooms"]
    assert [room["id"] for room in rooms] == env.catalog.room_ids
    assert all("booked" not in room and "bookings_that_day" in room for room in rooms)


def test_checks_tool_takes_the_request_and_answers_with_each_rooms_verdict(
    scripted: Any, public: list[Task]
) -> None:
    """``tool_result: checks``: the tool's schema asks for the whole request, a call with the slot alone is
    refused naming the missing fields, and the verdicts follow the arguments the model wrote (a wrong head
    count gives wrong verdicts), in the words of the inline brief room lines; the default prompts describe it."""
    env = get_env("room_selection", tool_result="checks")
    task = public[1]  # 2025-10-13 14:30, 30 min, 12 attendees, whiteboard + confphone, accessible: Nova
    request = request_of(task.payload).model_dump()
    (definition,) = tool_definitions("checks")
    assert definition["function"]["parameters"]["required"] == list(request)
    assert "attendees" not in TOOL_DEFINITIONS[0]["function"]["parameters"]["properties"]
    assert "accessible_required" in env.default_prompts("tool")["system"].template
    assert env.default_prompts("tool_teacher") == env.default_prompts("tool")
    with pytest.raises(ToolCallError, match="attendees"):
        parse_tool_call(TOOL_NAME, GOOD_ARGS, "checks")
    two_attendees = json.dumps({**request, "attendees": 2})
    chat = scripted(
        [
            {"tool_calls": [_tool_call("c1", TOOL_NAME, GOOD_ARGS)]},
            {"tool_calls": [_tool_call("c2", TOOL_NAME, two_attendees)]},
            {"tool_calls": [_tool_call("c3", TOOL_NAME, json.dumps(request))]},
            {"content": "final_choice: Nova"},
        ]
    )
    resources = Resources(llm=_resources("tool", chat.base_url).llm, prompts=env.default_prompts("tool"))
    reward, spans = _run_in_rollout(env.agent("tool"), task, resources)
    assert reward == 1.0 and chat.requests[0]["tools"] == tool_definitions("checks")
    results = [json.loads(m["content"]) for m in chat.requests[-1]["messages"] if m["role"] == "tool"]
    assert "attendees" in results[0]["error"]
    verdicts_for_two, verdicts = results[1]["rooms"], results[2]["rooms"]
    assert list(verdicts) == env.catalog.room_ids
    assert verdicts["Nova"].startswith("PASSES (slack 0,")
    assert [room for room, verdict in verdicts.items() if verdict.startswith("PASSES")] == ["Nova"]
    assert "too small" in verdicts["Lyra"] and "too small" not in verdicts_for_two["Lyra"]
    assert env.answer_of(spans) == "Nova"


def test_checks_tool_writes_verdict_first_lines_when_the_environment_asks(
    scripted: Any, public: list[Task]
) -> None:
    """``room_lines: verdict_first`` with the ``checks`` tool: the result is a list of lines with the verdict before
    the room, the same lines as the inline ``verdict_first`` prompt shows for that request (one way of writing a
    room for both forms), in catalog order; the name-keyed form stays the default."""
    env = get_env("room_selection", tool_result="checks", room_lines="verdict_first")
    task = public[1]
    request = request_of(task.payload).model_dump()
    chat = scripted([{"tool_calls": [_tool_call("c1", TOOL_NAME, json.dumps(request))]}, {"content": "final_choice: Nova"}])
    resources = Resources(llm=_resources("tool", chat.base_url).llm, prompts=env.default_prompts("tool"))
    reward, _ = _run_in_rollout(env.agent("tool"), task, resources)
    (tool_message,) = [m for m in chat.requests[-1]["messages"] if m["role"] == "tool"]
    lines = json.loads(tool_message["content"])["rooms"]
    inline = prompt_values("inline", request_of(task.payload), env.catalog, "verdict_first")["rooms"]
    assert reward == 1.0
    assert [f"- {line}" for line in lines] == inline.splitlines()
    assert [line.split()[1] for line in lines] == env.catalog.room_ids
    assert [line for line in lines if line.startswith("PASSES: ")] == ["PASSES: Nova (slack 0, extra 1, 45 m, 0 bookings)"]


def test_checks_tool_result_written_one_room_per_line_when_the_environment_asks(
    scripted: Any, public: list[Task]
) -> None:
    """``tool_content: lines``: the tool message is plain text, one room per line, the inline prompt's lines for
    ``verdict_first`` (without the list dash) and ``room: verdict`` for the name-keyed form; a refused call is one
    ``error:`` line; a tool that returns room records cannot be written as lines (refused at construction, naming
    the option)."""
    task = public[1]
    request = request_of(task.payload).model_dump()
    for room_lines, passing in [("verdict_first", "PASSES: Nova (slack 0, "), ("full", "Nova: PASSES (slack 0, ")]:
        env = get_env("room_selection", tool_result="checks", room_lines=room_lines, tool_content="lines")
        chat = scripted([{"tool_calls": [_tool_call("c1", TOOL_NAME, GOOD_ARGS)]},
                         {"tool_calls": [_tool_call("c2", TOOL_NAME, json.dumps(request))]},
                         {"content": "final_choice: Nova"}])
        resources = Resources(llm=_resources("tool", chat.base_url).llm, prompts=env.default_prompts("tool"))
        reward, _ = _run_in_rollout(env.agent("tool"), task, resources)
        refused, answered = [m["content"] for m in chat.requests[-1]["messages"] if m["role"] == "tool"]
        assert reward == 1.0
        assert refused.startswith("error: invalid arguments") and "attendees" in refused and "\n" not in refused
        lines = answered.splitlines()
        assert len(lines) == len(env.catalog.room_ids)
        assert [line for line in lines if "PASSES" in line] == [line for line in lines if line.startswith(passing)]
        assert len([line for line in lines if "PASSES" in line]) == 1
        if room_lines == "verdict_first":
            inline = prompt_values("inline", request_of(task.payload), env.catalog, "verdict_first")["rooms"]
            assert [f"- {line}" for line in lines] == inline.splitlines()
    with pytest.raises(ValueError, match="tool_content 'lines'.*'brief'"):
        get_env("room_selection", tool_result="brief", tool_content="lines")
    with pytest.raises(ValueError, match="tool_content must be one of"):
        get_env("room_selection", tool_result="checks", tool_content="yaml")


def test_tool_agent_stops_after_max_turns(scripted: Any, public: list[Task], catalog: Catalog) -> None:
    chat = scripted([{"tool_calls": [_tool_call(f"c{i}", TOOL_NAME, GOOD_ARGS)]} for i in range(2)])
    agent = make_agent("tool", catalog, max_turns=2)
    assert agent(public[1].payload, _resources("tool", chat.base_url)) == 0.0
    assert len(chat.requests) == 2


def test_inline_agent_continues_the_answer_prefix(
    scripted: Any, env: RoomSelectionEnv, public: list[Task]
) -> None:
    chat = scripted([{"content": " Nova"}])
    reward, spans = _run_in_rollout(env.agent("inline"), public[1], _resources("inline", chat.base_url))
    assert reward == 1.0
    (request,) = chat.requests
    assert request["messages"][-1] == {"role": "assistant", "content": "final_choice:"}
    assert {key: request[key] for key in CONTINUE_ANSWER} == CONTINUE_ANSWER
    user = request["messages"][1]["content"]
    assert "- Nova: free: yes; capacity 12 >= 12: yes; has needs: yes; accessibility ok: yes. PASSES" in user
    assert user.endswith("Answer with one of: Orion, Lyra, Vega, Nova, Quark, Atlas, Pulse, No Room.")
    assert "tools" not in request
    assert env.answer_of(spans) == "Nova"


def test_inline_agent_without_prefix_makes_a_plain_call(
    scripted: Any, env: RoomSelectionEnv, public: list[Task]
) -> None:
    chat = scripted([{"content": "final_choice: Orion"}])
    resources = _resources("inline", chat.base_url, answer_prefix=PromptTemplate(template=""))
    assert env.agent("inline")(public[1].payload, resources) == 0.0
    (request,) = chat.requests
    assert [m["role"] for m in request["messages"]] == ["system", "user"]
    assert "continue_final_message" not in request


def test_teacher_sends_the_inline_request_with_the_solvers_answer(
    scripted: Any, env: RoomSelectionEnv, public: list[Task]
) -> None:
    chat = scripted([{"content": " Nova"}, {"content": " Nova"}, {"content": "final_choice: Nova"}])
    reward, spans = _run_in_rollout(env.agent("teacher"), public[1], _resources("teacher", chat.base_url))
    assert reward == 1.0 and env.answer_of(spans) == "Nova"
    env.agent("inline")(public[1].payload, _resources("inline", chat.base_url))
    no_prefix = _resources("teacher", chat.base_url, answer_prefix=PromptTemplate(template=""))
    env.agent("teacher")(public[1].payload, no_prefix)
    teacher, inline, plain = chat.requests
    assert teacher.pop("rltrain_completion") == " Nova"  # after the prefix: "final_choice: Nova"
    assert teacher == inline
    assert plain["rltrain_completion"] == "final_choice: Nova" and "continue_final_message" not in plain


def test_passing_style_teacher_copies_the_passing_rooms_then_chooses(
    scripted: Any, public: list[Task], catalog: Catalog
) -> None:
    """``answer_style: passing``: the prompts ask for the passing rooms first and the inline answer prefix is
    ``passing:``; the teacher's reply lists the rooms that pass in catalog order with their tie-break values,
    then the solver's choice, which the grade reads; ``passing: none`` when no room passes."""
    env = get_env("room_selection", room_lines="brief", answer_style="passing")
    prompts = env.default_prompts("teacher")
    assert prompts["answer_prefix"].template == "passing:" and "passing: <ROOM_ID" in prompts["system"].template
    assert "passing: <ROOM_ID" in env.default_prompts("tool")["system"].template
    assert env.default_prompts("tool")["system"].template.count("final_choice:") == 1
    task = next(t for t in public if sum(c.passes for c in check_rooms(request_of(t.payload), catalog)) >= 2)
    request = request_of(task.payload)
    passing = [c for c in check_rooms(request, catalog) if c.passes]  # more than one: the tie-breaks decide
    chat = scripted([{"content": "echo"}])
    resources = Resources(llm=_resources("teacher", chat.base_url).llm, prompts=prompts)
    env.agent("teacher")(task.payload, resources)
    (sent,) = chat.requests
    reply = sent["rltrain_completion"]
    first, second = reply.split("\n")
    assert first == " " + ", ".join(
        f"{c.room.id} (slack {c.capacity_slack}, extra {c.extra_equipment}, {c.room.distance_m} m, "
        f"{c.bookings_that_day} bookings)" for c in passing
    )
    assert second == f"final_choice: {solve(request, catalog)}"
    assert sent["messages"][-1] == {"role": "assistant", "content": "passing:"}
    assert grade("passing:" + reply, task.payload["expected_choice"], catalog.room_ids).correct
    none_task = next(t for t in public if t.payload["expected_choice"] == NO_ROOM)
    chat = scripted([{"content": "echo"}])
    resources = Resources(llm=_resources("teacher", chat.base_url).llm, prompts=prompts)
    env.agent("teacher")(none_task.payload, resources)
    assert chat.requests[0]["rltrain_completion"] == " none\nfinal_choice: No Room"
    with pytest.raises(ValueError, match="answer_style must be one of"):
        get_env("room_selection", answer_style="explained")


def test_stepwise_teacher_narrows_the_passing_rooms_one_tie_break_at_a_time(
    public: list[Task], catalog: Catalog
) -> None:
    """``answer_style: stepwise``: after the passing line, each line keeps the rooms with the smallest value of the
    next tie-break (``slack 0: Orion, Nova``), until one is left; the final choice is the solver's, and a single
    passing room (or none) needs no narrowing."""
    env = get_env("room_selection", room_lines="verdict_first", answer_style="stepwise")
    assert env.default_prompts("teacher")["answer_prefix"].template == "passing:"
    assert "slack <smallest>: <ROOM_ID, ...>" in env.default_prompts("inline")["system"].template
    narrowed = 0
    for task in public:
        request = request_of(task.payload)
        passing = [c for c in check_rooms(request, catalog) if c.passes]
        lines = teacher_answer(request, catalog, "stepwise").split("\n")
        assert lines[0] == teacher_answer(request, catalog, "passing").split("\n")[0]
        assert lines[-1] == f"final_choice: {solve(request, catalog)}"
        steps = lines[1:-1]
        assert not steps if len(passing) < 2 else steps
        left = passing
        for step, (name, position) in zip(steps, [("slack", 0), ("extra", 1), ("distance", 2), ("bookings", 3)]):
            best = min(c.rank[position] for c in left)
            left = [c for c in left if c.rank[position] == best]
            assert step.startswith(f"{name} {best}") and step.endswith(": " + ", ".join(c.room.id for c in left))
        if steps:
            narrowed += 1
            assert len(left) == 1 or len(steps) == 4
            assert left[0].room.id == solve(request, catalog)
        assert grade("\n".join(lines), task.payload["expected_choice"], catalog.room_ids).correct
    assert narrowed >= 5  # the public requests exercise the narrowing, not only the trivial cases


def test_agent_names_a_missing_prompt(public: list[Task]) -> None:
    resources = _resources("tool")
    resources.prompts.pop("user")
    with pytest.raises(KeyError, match="needs a prompt template named 'user'"):
        make_agent("tool")(public[0].payload, resources)


# -- the environment ---------------------------------------------------------------------------------------


def test_env_registry_and_protocol(env: RoomSelectionEnv) -> None:
    assert isinstance(get_env("room_selection"), Environment)
    assert env.answer_space() == [*env.catalog.room_ids, NO_ROOM]
    assert set(env.default_prompts("inline")) == {"system", "user", "answer_prefix"}
    assert env.default_prompts("teacher") == env.default_prompts("inline")
    assert env.default_prompts("solver") == {}
    with pytest.raises(ValueError, match="unknown room-selection agent mode 'chat'"):
        env.agent("chat")
    # other test modules register environments of their own when collected, so only ours is checked for
    with pytest.raises(UnknownEnvironmentError, match=r"known environments: \[.*'room_selection'.*\]"):
        get_env("rooms")
    with pytest.raises(EnvironmentOptionsError, match="does not accept options"):
        get_env("room_selection", catalogue="x.json")
    with pytest.raises(EnvironmentOptionsError, match=r"env.options: room_selection option room_lines .*'bogus'"):
        get_env("room_selection", room_lines="bogus")


def test_two_catalogs_in_one_process(tmp_path: Path, env: RoomSelectionEnv) -> None:
    # Nova shrinks to 9 seats: 12-person requests have no room any more.
    path = _write_catalog(tmp_path, lambda d: d["rooms"][3].update(capacity=9))
    small = get_env("room_selection", catalog=path)
    tasks = small.load_tasks("generated:n=40,seed=2")
    relabelled = [
        t for t in tasks if solve(request_of(t.payload), env.catalog) != t.payload["expected_choice"]
    ]
    assert relabelled  # the two catalogs disagree on some requests...
    resources = _resources("solver")
    assert [small.reference_agent()(t.payload, resources) for t in tasks] == [1.0] * 40
    assert [env.reference_agent()(t.payload, resources) for t in relabelled] == [0.0] * len(relabelled)
    # ...and a task that names its catalog is answered against it, whichever agent runs it.
    named = [{**t.payload, "catalog_path": str(path)} for t in relabelled]
    assert [env.reference_agent()(payload, resources) for payload in named] == [1.0] * len(named)


def test_reference_policies_match_calibration_on_the_first_28() -> None:
    """CALIBRATION.md's trivial policies on the first 28 public requests: 0.214 / 0.710 / 0.750 (ours is exact)."""
    env = RoomSelectionEnv()
    policies = env.reference_policies(env.load_tasks("public:train"))
    assert policies["always No Room"] == pytest.approx(0.214, abs=5e-4)
    assert policies["random feasible room"] == pytest.approx(0.710, abs=2e-3)  # theirs: a 1000-seed mean
    assert policies["first feasible room"] == pytest.approx(0.750, abs=5e-4)


def test_brief_room_lines_state_the_same_checks_in_fewer_words() -> None:
    """``room_lines: brief`` (an environment option) writes each room as its verdict plus the failed checks or the
    tie-break values; the facts are the full lines', in catalog order; ``verdict_first`` puts the verdict first."""
    env = get_env("room_selection", room_lines="brief")
    assert env.room_lines == "brief"
    for task in env.load_tasks("public:val"):
        request = request_of(task.payload)
        full = prompt_values("inline", request, env.catalog)["rooms"].splitlines()
        brief = prompt_values("inline", request, env.catalog, "brief")["rooms"].splitlines()
        assert len(brief) == len(full) == len(env.catalog.rooms)
        for full_line, brief_line, check in zip(full, brief, check_rooms(request, env.catalog), strict=True):
            assert brief_line.startswith(f"- {check.room.id}: ") and len(brief_line) < len(full_line)
            assert ("PASSES" in brief_line) == check.passes == ("PASSES" in full_line)
            assert ("busy" in brief_line) == (not check.free)
            if check.passes:
                assert f"slack {check.capacity_slack}, extra {check.extra_equipment}" in brief_line
        # verdict_first: the same line with the verdict before the room, so a passing room's name follows PASSES
        first = prompt_values("inline", request, env.catalog, "verdict_first")["rooms"].splitlines()
        for brief_line, first_line, check in zip(brief, first, check_rooms(request, env.catalog), strict=True):
            verdict, details = brief_line.removeprefix(f"- {check.room.id}: ").split(" ", 1)
            assert first_line == f"- {verdict}: {check.room.id} {details}"
    with pytest.raises(ValueError, match="room_lines must be one of"):
        get_env("room_selection", room_lines="short")


# -- random catalogs (generated:...,catalogs=random) -------------------------------------------------------


@pytest.fixture(scope="module")
def own_catalog_tasks(env: RoomSelectionEnv) -> list[Task]:
    return env.load_tasks("generated:n=60,seed=5,catalogs=random")


def _own_catalog(task: Task) -> Catalog:
    return Catalog.model_validate(task.payload["catalog"])


def test_a_generated_catalog_round_trips_through_its_file(tmp_path: Path) -> None:
    generated = generate_catalog("room-catalog/5/0")
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(generated.model_dump()))
    assert load_catalog(path) == generated
    assert generate_catalog("room-catalog/5/0") == generated  # a seed is a catalog
    assert generate_catalog("room-catalog/5/1") != generated


def test_generated_catalogs_draw_their_names_from_a_large_pool() -> None:
    catalogs = generate_catalogs(3, 200)
    names = Counter(room.id for catalog in catalogs for room in catalog.rooms)
    assert len(ROOM_NAMES) >= 400 and set(names) <= set(ROOM_NAMES)
    assert not {"Orion", "Lyra", "Vega", "Nova", "Quark", "Atlas", "Pulse"} & set(ROOM_NAMES)
    assert len(names) > 300 and max(names.values()) < 15  # ~1,400 rooms over 400 names: none favoured
    assert {len(catalog.rooms) for catalog in catalogs} == set(range(MIN_ROOMS, MAX_ROOMS + 1))
    assert all(catalog.booking_dates for catalog in catalogs)


def test_catalog_tasks_carry_their_catalog_and_the_solvers_label(
    tmp_path: Path, catalog: Catalog, own_catalog_tasks: list[Task]
) -> None:
    rows = [task.payload for task in own_catalog_tasks]
    assert [row["id"] for row in rows] == [f"g5c-{i}" for i in range(60)]
    assert len({json.dumps(row["catalog"], sort_keys=True) for row in rows}) == 60  # a catalog per task
    for task in own_catalog_tasks:
        own = _own_catalog(task)
        assert solve(request_of(task.payload), own) == task.payload["expected_choice"]
        assert request_of(task.payload).date in own.booking_dates
    assert max(len(json.dumps(row)) for row in rows) < MAX_ROW_BYTES // 4
    kinds = Counter(
        row["expected_choice"] if row["expected_choice"] == NO_ROOM
        else Catalog.model_validate(row["catalog"]).room_ids.index(row["expected_choice"]) for row in rows
    )
    assert max(kinds.values()) <= (MAX_LABEL_SHARE + 0.02) * 60  # balanced by answer kind, names differ
    # written and read back, the rows are the same; the reference catalog's answers do not constrain them
    loaded = load_tasks(write_tasks(tmp_path / "own.jsonl", rows), answers=catalog.answer_space())
    assert [task.payload for task in loaded] == rows


def test_catalogs_k_shares_k_catalogs_round_robin(env: RoomSelectionEnv) -> None:
    tasks = env.load_tasks("generated:n=9,seed=5,catalogs=3")
    assert [_own_catalog(t) for t in tasks] == generate_catalogs(5, 3) * 3
    # catalogs=n is catalogs=random
    assert [t.payload for t in env.load_tasks("generated:n=9,seed=5,catalogs=9")] == [
        t.payload for t in env.load_tasks("generated:n=9,seed=5,catalogs=random")
    ]


def test_sets_with_different_seeds_share_no_catalog(env: RoomSelectionEnv) -> None:
    """The ladders' training (11), selection (7), APO (12) and unseen-catalog (99) sets."""
    specs = ["generated:n=300,seed=11,catalogs=random", "generated:n=100,seed=7,catalogs=random",
             "generated:n=40,seed=12,catalogs=random", "generated:n=100,seed=99,catalogs=random"]
    seen: dict[str, str] = {}
    for spec in specs:
        for task in env.load_tasks(spec):
            key = json.dumps(task.payload["catalog"], sort_keys=True)
            assert seen.setdefault(key, spec) == spec, f"{spec} repeats a catalog of {seen[key]}"
    assert len(seen) == 540


def test_tool_call_returns_the_tasks_own_catalog(
    scripted: Any, env: RoomSelectionEnv, own_catalog_tasks: list[Task]
) -> None:
    first, second = own_catalog_tasks[:2]
    for task in (first, second):
        request, own = request_of(task.payload), _own_catalog(task)
        args = json.dumps({"date": request.date, "time": request.time, "duration_min": request.duration_min})
        chat = scripted([{"tool_calls": [_tool_call("c1", TOOL_NAME, args)]},
                         {"content": f"final_choice: {task.payload['expected_choice']}"}])
        reward, spans = _run_in_rollout(env.agent("tool"), task, _resources("tool", chat.base_url))
        assert reward == 1.0
        result = json.loads(chat.requests[-1]["messages"][-1]["content"])
        assert [room["id"] for room in result["rooms"]] == own.room_ids
        assert [room["free"] for room in result["rooms"]] == [c.free for c in check_rooms(request, own)]
        expected = task.payload["expected_choice"]
        place = expected if expected == NO_ROOM else f"room #{own.room_ids.index(expected) + 1}"
        assert env.answer_of(spans) == place
    assert _own_catalog(first).room_ids != _own_catalog(second).room_ids


def test_inline_prompt_lists_the_tasks_own_rooms_and_grades_against_them(
    scripted: Any, env: RoomSelectionEnv, own_catalog_tasks: list[Task]
) -> None:
    task = next(t for t in own_catalog_tasks if t.payload["expected_choice"] != NO_ROOM)
    own, other = _own_catalog(task), _own_catalog(own_catalog_tasks[0 if task is not own_catalog_tasks[0] else 1])
    stranger = next(name for name in other.room_ids if name not in own.room_ids)
    chat = scripted([{"content": f" {task.payload['expected_choice']}"}, {"content": f" {stranger}"}])
    reward, _ = _run_in_rollout(env.agent("inline"), task, _resources("inline", chat.base_url))
    assert reward == 1.0
    user = chat.requests[0]["messages"][1]["content"]
    assert [line.split(":")[0] for line in user.splitlines() if line.startswith("- ")] == [
        f"- {room}" for room in own.room_ids
    ]
    assert user.endswith(f"Answer with one of: {', '.join(own.room_ids)}, No Room.")
    assert "Orion" not in user
    # a room of another task's catalog is no answer to this one
    reward, spans = _run_in_rollout(env.agent("inline"), task, _resources("inline", chat.base_url))
    assert reward == 0.0 and env.answer_of(spans) is None


def test_trivial_policies_read_each_tasks_own_catalog(tmp_path: Path, env: RoomSelectionEnv) -> None:
    tasks = env.load_tasks("generated:n=40,seed=8,catalogs=1")
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(tasks[0].payload["catalog"]))
    fixed = get_env("room_selection", catalog=path)
    same_without_catalog = [Task(id=t.id, payload={k: v for k, v in t.payload.items() if k != "catalog"})
                            for t in tasks]
    assert env.reference_policies(tasks) == fixed.reference_policies(same_without_catalog)
    assert env.reference_policies(tasks) != env.reference_policies(env.load_tasks("generated:n=40,seed=8"))


def test_the_ladder_report_shows_each_sets_top_answers() -> None:
    """A set of unseen catalogs can collapse (here onto `No Room`) where the first set does not."""
    summaries = [
        EvalSummary(task_set="public:val", n=12, accuracy=0.75, mean_reward=0.75,
                    answer_distribution={"Pulse": 0.42, "No Room": 0.42, "Nova": 0.16}),
        EvalSummary(task_set="generated:n=100,seed=99,catalogs=random", n=100, accuracy=0.28, mean_reward=0.28,
                    answer_distribution={"No Room": 0.78, "room #1": 0.17, "room #3": 0.05}),
    ]
    rung = RungResult(name="warm start", summaries=summaries, agent_tokens=0, wall_s=1.0)
    report = render_markdown(LadderResult(recipe="r", target=1.0, rungs=[rung]))
    assert "| warm start | Pulse 42%, No Room 42%, Nova 16% | No Room 78%, room #1 17%, room #3 5% |" in report
