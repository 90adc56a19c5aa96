"""Bad input: recipes, task rows and gateway request bodies, fuzzed with hypothesis, and oversized requests.

The property is the same for all three: whatever comes in is accepted or refused with the module's own error
type, whose message names where the problem is (the file and field, the file and line, the request field) and
what was given; nothing else happens (no other exception, no span written, no status 5xx). The strategies mutate
a valid input at a random place, so most examples get past the first check and reach the deeper ones.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from live_gateway import QUESTION, error_of, serve, start_rollouts
from test_gateway import ScriptedEngine

from rltrain.engines.transformers import TransformersEngine
from rltrain.envs.room_selection.catalog import load_catalog, reference_catalog_path
from rltrain.envs.room_selection.tasks import TaskRow, TaskSpecError, load_tasks
from rltrain.gateway import create_app
from rltrain.gateway.app import BODY_BYTES_BASE, BODY_BYTES_PER_TOKEN
from rltrain.recipes import Recipe, RecipeError, load_recipe, parse_recipe
from rltrain.store import MemoryStore, SqliteStore

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: keys as YAML/JSON authors write them (no ": " or "." inside, which would blur the dotted field paths)
KEYS = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=6)


#: text with lone UTF-16 surrogates among letters and digits (hypothesis's own text strategy never draws them)
SURROGATE_TEXT = st.text(alphabet=st.characters(categories=["Cs", "Ll", "Nd"]), min_size=1, max_size=6)
SURROGATE_VALUES = st.recursive(SURROGATE_TEXT | SCALARS, lambda inner: st.lists(inner, max_size=3)
                                | st.dictionaries(KEYS | SURROGATE_TEXT, inner, max_size=3), max_leaves=6)


@st.composite
def mutated(draw: st.DrawFn, valid: dict[str, Any], values: st.SearchStrategy[Any] = VALUES) -> tuple[Any, list[Any]]:
    """A deep copy of ``valid`` with one value, at a random path, replaced (or one key added) by one of ``values``:
    the data and that path."""
    data = copy.deepcopy(valid)
    node: Any = data
    path: list[Any] = []
    while True:
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys) | KEYS) if isinstance(node, dict) else draw(st.sampled_from(keys))
        child = node[key] if key in keys else None
        path.append(key)
        if isinstance(child, dict | list) and child and draw(st.booleans()):
            node = child
            continue
        node[key] = draw(values)
        return data, path


# -- recipes ------------------------------------------------------------------------------------------------
VALID_RECIPE: dict[str, Any] = {
    "name": "fuzz",
    "model": {"name": "SmolLM2-135M-Instruct", "dtype": "float32", "num_threads": 1},
    "gateway": {"host": "127.0.0.1", "port": 0, "max_n": 4},
    "env": {"name": "room_selection", "mode": "inline", "options": {}},
    "data": {"train": "public:train", "val": "public:val", "extra_eval": ["generated:n=4,seed=1"], "limit": 2},
    "runner": {"concurrency": 2, "timeout_s": 10.0, "max_attempts": 2, "max_failed_fraction": 0.5},
    "sampling": {"train": {"temperature": 1.0, "max_tokens": 8}, "eval": {"temperature": 0.0, "max_tokens": 8}},
    "prompts": {},
    "algorithm": {"name": "grpo", "max_steps": 2, "num_generations": 4, "lora": {"r": 4, "alpha": 8}},
}


def _named_paths(message: str, source: str) -> list[str]:
    lines = message.splitlines()
    assert lines and all(line.startswith(f"{source}: ") for line in lines), message
    return [line[len(source) + 2 :].split(": ", 1)[0] for line in lines]


@FUZZ
@given(mutated(VALID_RECIPE))
def test_recipe_mutations_are_accepted_or_named(case: tuple[dict[str, Any], list[Any]]) -> None:
    data, path = case
    dotted = ".".join(map(str, path))
    try:
        recipe = parse_recipe(data, "fuzz.yaml")
    except RecipeError as exc:
        message = str(exc)
        for named in _named_paths(message, "fuzz.yaml"):
            if named == "(top level)":  # a check across fields: its message names the field
                assert str(path[0]) in message
            else:  # the changed field, a section above it, or a field inside the value put there
                assert dotted.startswith(named) or named.startswith(dotted), (named, dotted, message)
        assert "unknown key" in message or "(got " in message, message
    else:
        assert isinstance(recipe, Recipe)


@FUZZ
@given(st.text(max_size=200))
@example("runner: {concurrency: 2001-02-30}")  # a YAML date that is no calendar date
@example("runner:\n  timeout_s: !!int five\n")
@example("[" * 5000)  # nested deeper than the YAML parser recurses
def test_any_recipe_text_is_a_recipe_or_a_recipe_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError as exc:
        assert str(exc).startswith(f"{path}: "), str(exc)


@FUZZ
@given(st.text(max_size=40))
@example("runner.concurrency=2001-02-30")
@example("runner.timeout_s=!!float x")
def test_any_override_is_applied_or_refused(override: str) -> None:
    try:
        parse_recipe({}, "<defaults>", [override])
    except RecipeError as exc:
        assert repr(override) in str(exc) or str(exc).startswith("<defaults>: "), str(exc)


# -- task rows (room selection JSONL) ---------------------------------------------------------------------
VALID_ROW: dict[str, Any] = {
    "id": "fuzzed",
    "task_input": {"date": "2025-10-13", "time": "14:30", "duration_min": 30, "attendees": 12,
                   "needs": ["whiteboard", "confphone"], "accessible_required": True},
    "expected_choice": "Nova",
}
#: a garbage line: any text or bytes (UTF-8 or not) without a "\n"
ONE_LINE = (
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80).map(str.encode)
    | st.binary(max_size=40)
).map(lambda raw: raw.replace(b"\n", b""))


@pytest.fixture(scope="module")
def answers() -> list[str]:
    return load_catalog(reference_catalog_path()).answer_space()


@FUZZ
@given(
    line=mutated(VALID_ROW).map(lambda case: json.dumps(case[0]).encode()) | ONE_LINE,
    position=st.integers(min_value=0, max_value=2),
)
@example(line=b"[" * 100_000, position=1)  # nested deeper than the JSON parser recurses
@example(line=b'{"id": "row-0"}', position=2)
@example(line=b'{"id": "\xff"}', position=1)  # not UTF-8
@example(line=json.dumps({**VALID_ROW, "id": "a\u2028b"}, ensure_ascii=False).encode(), position=0)
def test_task_rows_are_loaded_or_the_line_is_named(
    tmp_path_factory: pytest.TempPathFactory, answers: list[str], line: bytes, position: int
) -> None:
    rows = [json.dumps({**VALID_ROW, "id": f"row-{i}"}).encode() for i in range(2)]
    rows.insert(position, line)
    path = tmp_path_factory.mktemp("tasks") / "tasks.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    try:
        tasks = load_tasks(path, answers=answers)
    except TaskSpecError as exc:
        message = str(exc)
        # the bad line, or (an id used twice) the later of the two lines
        assert message.startswith(f"{path}:{position + 1}: ") or "already used on line" in message, message
        assert not _is_good_row(line, answers), f"a good row was refused: {message}"
    else:
        blank = not line.decode("utf-8", errors="replace").strip()  # skipped, as str.strip sees it
        assert len(tasks) == (2 if blank else 3)
        assert blank or _is_good_row(line, answers)


def _is_good_row(line: bytes, answers: list[str]) -> bool:
    """Whether ``line`` is a row the file format allows, next to rows ``row-0`` and ``row-1``."""
    try:
        row = TaskRow.model_validate(json.loads(line.decode("utf-8")))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, not a row
        return False
    own_catalog = row.catalog is not None or row.catalog_path is not None  # checked against its own answers
    return row.id not in ("row-0", "row-1") and (own_catalog or row.expected_choice in answers)


# -- gateway request bodies -----------------------------------------------------------------------------------
VALID_BODY: dict[str, Any] = {
    "model": "scripted",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "max_tokens": 4,
    "temperature": 0.5,
    "n": 1,
    "stop": ["\n"],
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
}


@pytest.fixture(scope="module")
def fuzzed_gateway(tiny_model_dir: Path) -> Iterator[tuple[TestClient, MemoryStore]]:
    """The gateway app in-process over a scripted engine (what is fuzzed is everything before the engine)."""
    from transformers import AutoTokenizer

    store = MemoryStore()
    start_rollouts(store, ["ro-fuzz"])
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_model_dir), "Room Nova.")
    with TestClient(create_app(engine, store, max_n=4)) as client:
        yield client, store


def _check_response(response: httpx.Response, store: MemoryStore | SqliteStore, spans_before: int) -> None:
    assert response.status_code in (200, 400, 404, 409, 413), response.text
    spans_after = len(store.get_spans("ro-fuzz"))
    if response.status_code == 200:
        assert spans_after == spans_before + len(response.json()["choices"])
        return
    assert spans_after == spans_before, "a refused request wrote nothing"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if error["param"] and response.status_code == 400 and error["code"] is None:
        assert error["param"].split(".")[0] in error["message"]


@FUZZ
@given(mutated(VALID_BODY))
def test_mutated_request_bodies_are_served_or_refused_with_the_field(
    fuzzed_gateway: tuple[TestClient, MemoryStore], case: tuple[dict[str, Any], list[Any]]
) -> None:
    client, store = fuzzed_gateway
    before = len(store.get_spans("ro-fuzz"))
    response = client.post("/rollouts/ro-fuzz/attempts/1/v1/chat/completions", content=json.dumps(case[0]),
                           headers={"content-type": "application/json"})  # json.dumps: NaN and Infinity too
    _check_response(response, store, before)


@pytest.fixture(scope="module")
def fuzzed_sqlite_gateway(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, SqliteStore]]:
    """As :func:`fuzzed_gateway`, over the SQLite store (which writes spans as JSON text, so it cannot take text
    that is not Unicode)."""
    from transformers import AutoTokenizer

    store = SqliteStore(tmp_path_factory.mktemp("fuzz-store") / "store.sqlite")
    start_rollouts(store, ["ro-fuzz"])
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_model_dir), "Room Nova.")
    with TestClient(create_app(engine, store, max_n=4)) as client:
        yield client, store
    store.close()


@FUZZ
@given(mutated(VALID_BODY, SURROGATE_VALUES))
@example(({**VALID_BODY, "max_tokens": "\ud800\udc00"}, ["max_tokens"]))  # a pair: it travels as one character
def test_bodies_with_lone_surrogates_are_refused_or_recorded_never_dropped(
    fuzzed_sqlite_gateway: tuple[TestClient, SqliteStore], case: tuple[dict[str, Any], list[Any]]
) -> None:
    """Anywhere in the body, a lone surrogate is a 400 naming the field; a body served is recorded (read back from
    SQLite), never answered 200 with its span dropped."""
    client, store = fuzzed_sqlite_gateway
    before = len(store.get_spans("ro-fuzz"))
    raw = json.dumps(case[0])  # ensure_ascii: a lone surrogate travels as its escape, as JSON allows
    response = client.post("/rollouts/ro-fuzz/attempts/1/v1/chat/completions", content=raw,
                           headers={"content-type": "application/json"})
    _check_response(response, store, before)
    if not _all_text(json.loads(raw)):  # what the gateway reads: an escaped high+low pair decodes to one character
        assert response.status_code == 400 and "lone UTF-16 surrogate" in response.json()["error"]["message"]


def _all_text(value: Any) -> bool:
    """Whether every string in ``value`` (keys too) is Unicode text (no lone surrogate)."""
    if isinstance(value, str):
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return all(_all_text(k) and _all_text(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_all_text(v) for v in value)
    return True


@FUZZ
@given(VALUES | st.binary(max_size=60).map(lambda raw: raw.decode("latin-1")))
@example("[" * 100_000)
def test_any_request_body_is_served_or_refused(
    fuzzed_gateway: tuple[TestClient, MemoryStore], body: Any
) -> None:
    client, store = fuzzed_gateway
    before = len(store.get_spans("ro-fuzz"))
    content = body if isinstance(body, str) else json.dumps(body)
    response = client.post("/rollouts/ro-fuzz/attempts/1/v1/chat/completions", content=content,
                           headers={"content-type": "application/json"})
    _check_response(response, store, before)


# -- oversized requests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "status", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "room " * 5000}]}, 400, "messages", "context_length_exceeded"),
        ({"max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
        ({"max_completion_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
        ({"n": 10**9}, 400, "n", None),
        ({"messages": [{"role": "user", "content": "x" * (BODY_BYTES_BASE + 2048 * BODY_BYTES_PER_TOKEN)}]},
         413, None, "request_too_large"),
    ],
    ids=["prompt-longer-than-context", "huge-max_tokens", "huge-max_completion_tokens", "huge-n", "huge-body"],
)
def test_oversized_requests_are_refused_with_4xx(
    engine: TransformersEngine, change: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    store = MemoryStore()
    start_rollouts(store, ["ro-big"])
    fitting = {"model": engine.model_name, "messages": QUESTION, "max_tokens": 2}
    url = "/rollouts/ro-big/attempts/1/v1/chat/completions"
    with serve(engine, store) as served:
        error = error_of(served.post(url, {**fitting, **change}), status)
        assert (error["param"], error["code"]) == (param, code)
        assert served.post(url, fitting).status_code == 200
    assert len(store.get_spans("ro-big")) == 1, "only the request that fit was recorded"


def test_a_body_streamed_past_the_limit_is_cut_off(engine: TransformersEngine) -> None:
    """A chunked body declares no length: it is refused once what arrived passes the limit."""
    store = MemoryStore()
    start_rollouts(store, ["ro-big"])
    limit = BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * engine.max_context
    chunk = b" " * 65536
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"model": "m", "messages": []'
        while sent < 4 * limit:
            sent += len(chunk)
            yield chunk

    with serve(engine, store) as served:
        response = httpx.post(f"{served.url}/rollouts/ro-big/attempts/1/v1/chat/completions", content=chunks(),
                              headers={"content-type": "application/json"}, timeout=60)
    assert error_of(response, 413)["code"] == "request_too_large"
    assert store.get_spans("ro-big") == []
