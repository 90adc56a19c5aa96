"""Transcripts for APO's critic, built from hand-made spans."""

from __future__ import annotations

import pytest

from rltrain.adapters.transcripts import Transcript, transcript_of
from rltrain.types import Rollout, Span, SpanKind, Task

SYSTEM = "You pick a meeting room. Answer with final_choice: <ROOM_ID>."


def make_rollout(**kw) -> Rollout:
    return Rollout(task=Task(id="req-7", payload={}), attempt_count=kw.pop("attempts", 1), **kw)


def span(ro: Rollout, seq: int, kind: SpanKind, name: str, attempt: int = 1, **attributes) -> Span:
    return Span(
        rollout_id=ro.rollout_id,
        attempt_no=attempt,
        sequence=seq,
        kind=kind,
        name=name,
        attributes=attributes,
    )


def llm(
    ro: Rollout, seq: int, messages, text, tool_calls=None, attempt: int = 1, tag: str | None = None
) -> Span:
    return span(
        ro, seq, SpanKind.LLM, "chat", attempt, messages=messages, text=text, tool_calls=tool_calls, tag=tag
    )


def agent_spans(ro: Rollout) -> list[Span]:
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "6 people, 14:00, projector"}]
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "check_room", "arguments": '{"room": "Nova"}'},
    }
    second = first + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "name": "check_room", "tool_call_id": "c1", "content": "Nova: busy 14:00-15:00"},
    ]
    return [
        llm(ro, 0, first, "", tool_calls=[call]),
        span(ro, 1, SpanKind.TOOL, "check_room", arguments={"room": "Nova"}, result="Nova: busy", error=None),
        span(
            ro,
            2,
            SpanKind.TOOL,
            "check_room",
            arguments={"room": "Vega"},
            result=None,
            error="KeyError: 'Vega'",
        ),
        llm(ro, 3, second, "final_choice: Orion"),
        span(ro, 4, SpanKind.LOG, "grade", choice="Orion", expected="Lyra", correct=False),
    ]


def test_transcript_takes_the_final_calls_messages_and_output() -> None:
    ro = make_rollout(reward=0.0)
    t = transcript_of(ro, agent_spans(ro))

    assert [m["role"] for m in t.messages] == ["system", "user", "assistant", "tool"]
    assert t.output_text == "final_choice: Orion"
    assert t.output_tool_calls == []
    assert [(x.name, x.arguments, x.result, x.error) for x in t.tools] == [
        ("check_room", {"room": "Nova"}, "Nova: busy", None),
        ("check_room", {"room": "Vega"}, None, "KeyError: 'Vega'"),
    ]
    assert t.grade is not None and (t.grade.choice, t.grade.expected, t.grade.correct) == (
        "Orion",
        "Lyra",
        False,
    )
    assert (t.reward, t.task_id, t.rollout_id) == (0.0, "req-7", ro.rollout_id)


def test_render_shows_everything_a_critic_needs() -> None:
    ro = make_rollout(reward=0.0)
    text = transcript_of(ro, agent_spans(ro)).render(max_chars=10_000)

    assert text.startswith(f"rollout {ro.rollout_id} (task req-7)\nreward: 0.0\n")
    assert "answer: Orion   expected: Lyra   correct: False" in text
    assert f"[system]\n{SYSTEM}" in text
    assert '[assistant]\ntool call: check_room({"room": "Nova"})' in text
    assert "[tool check_room]\nNova: busy 14:00-15:00" in text
    assert "## model output\nfinal_choice: Orion" in text
    assert 'check_room({"room": "Vega"}) error: KeyError: \'Vega\'' in text
    assert 'check_room({"room": "Nova"}) -> "Nova: busy"' in text


def test_render_cuts_the_middle_and_keeps_header_start_and_answer() -> None:
    ro = make_rollout(reward=1.0)
    long_tool = "x" * 5000
    messages = [{"role": "system", "content": SYSTEM}, {"role": "tool", "content": long_tool}]
    t = transcript_of(ro, [llm(ro, 0, messages, "final_choice: Lyra")])

    text = t.render(max_chars=600)
    assert len(text) <= 600
    assert "reward: 1.0" in text
    assert SYSTEM in text
    assert text.endswith("final_choice: Lyra")
    assert "characters left out" in text
    assert len(t.render(max_chars=20)) == 20


def test_render_rejects_a_non_positive_budget() -> None:
    ro = make_rollout(reward=1.0)
    with pytest.raises(ValueError, match="max_chars"):
        transcript_of(ro, []).render(max_chars=0)


def test_only_the_final_attempt_is_read() -> None:
    ro = make_rollout(reward=1.0, attempts=2)
    spans = [
        llm(ro, 0, [{"role": "user", "content": "old"}], "stale answer", attempt=1),
        span(ro, 1, SpanKind.EXCEPTION, "error", attempt=1, type="TimeoutError", message="slow"),
        llm(ro, 0, [{"role": "user", "content": "new"}], "final_choice: Lyra", attempt=2),
    ]
    t = transcript_of(ro, spans)
    assert t.output_text == "final_choice: Lyra"
    assert t.messages == [{"role": "user", "content": "new"}]
    assert t.errors == []


def test_errors_and_a_missing_grade_and_output_are_rendered() -> None:
    ro = make_rollout(reward=None, error="agent raised ValueError")
    spans = [span(ro, 0, SpanKind.EXCEPTION, "error", type="ValueError", message="bad json")]
    t = transcript_of(ro, spans)
    assert t.grade is None and t.messages == [] and t.output_text is None
    text = t.render()
    assert "reward: none" in text
    assert "(no output)" in text
    assert "## errors\nValueError: bad json\nrollout error: agent raised ValueError" in text


def test_tag_picks_the_last_call_of_that_role() -> None:
    ro = make_rollout(reward=1.0)
    spans = [
        llm(ro, 0, [{"role": "user", "content": "solve"}], "final_choice: Lyra", tag="solver"),
        llm(ro, 1, [{"role": "user", "content": "judge it"}], "looks right", tag="judge"),
    ]
    assert transcript_of(ro, spans, tag="solver").output_text == "final_choice: Lyra"
    assert transcript_of(ro, spans).output_text == "looks right"


def test_content_parts_and_flat_tool_calls_render_as_text() -> None:
    t = Transcript(
        rollout_id="ro-1",
        task_id="t",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}],
            }
        ],
        output_tool_calls=[{"name": "book", "arguments": {"room": "Lyra"}}],
    )
    text = t.render()
    assert "[user]\npart one\ntwo" in text
    assert 'tool call: book({"room": "Lyra"})' in text
