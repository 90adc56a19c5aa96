"""Per-rollout sessions: token-in/token-out prefix reuse across the turns of an agent (design decision 1).

An agent sends the whole conversation on every call. Re-tokenising it would not give back the tokens the model
sampled (a completion's ids are rarely the canonical tokenisation of its text), so a multi-turn rollout would
not be one consistent training row. Instead the gateway keeps, per (rollout, attempt), every earlier turn: the
messages it was asked about, the prompt ids, the sampled completion ids, and the assistant message it returned.

For a new request it looks for the longest earlier turn ``T`` such that the new messages are ``T``'s messages,
then ``T``'s returned assistant message, then more. The prompt is then ``T``'s prompt ids + ``T``'s completion
ids (+ the template's turn-closing tokens when ``T`` did not end on an end-of-turn token, e.g. cut by
``max_tokens``) + the tokens of the rest: the full conversation is rendered (gateway-made assistant messages
from their raw text), checked to start with the text ``T``'s ids stand for, and only the remainder is
tokenised. When no turn matches (the agent rewrote its history) or the check fails (a template that renders
earlier turns differently), the whole prompt is tokenised and ``prefix_reused`` is false: served, never an
error; the trajectory adapter starts a new row there.

Such a fork splits a rollout into several training rows, which is rarely what the agent's author meant, so the
plan names its cause (``fork_cause``, one of :data:`FORK_CAUSES`, recorded in the llm span and counted by the
adapter) and the first fork of each rollout is logged at WARNING with the fix. A call that shares nothing with
the earlier turns (another conversation in the same rollout, e.g. a second agent) is not a fork of them: it has
no cause and no warning.

Memory is bounded: a session is dropped when its rollout finishes (:meth:`SessionStore.drop`), a new attempt
replaces the previous attempt's session, a session keeps its latest ``max_turns`` turns (each holds its ids and
their text, about 12 bytes per token), and at most ``max_sessions`` sessions are kept (least recently used
dropped first). All methods are thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from rltrain.gateway.chat_format import ChatFormat
from rltrain.gateway.schemas import ChatMessage, MessageKey, ToolSpec

logger = logging.getLogger(__name__)

TOOLS_DIFFER = "tools_differ"
SYSTEM_DIFFERS = "system_prompt_differs"
TEMPLATE_RERENDERS = "template_rerenders_history"
HISTORY_REWRITTEN = "history_rewritten"
FORK_CAUSES: dict[str, str] = {
    TOOLS_DIFFER: "tools differ from the earlier turn's (the tools are rendered into the prompt, so a call without "
    "the same tools= renders a different prompt); fix: pass the same tools= (and tool_choice) on every call of "
    "the rollout",
    SYSTEM_DIFFERS: "the system prompt differs from the earlier turn's; fix: send the same system message on "
    "every call of the rollout",
    TEMPLATE_RERENDERS: "the template re-renders history (the earlier turns render differently from the tokens "
    "that were sampled, e.g. a template that drops past reasoning or reformats past tool calls); fix: use a chat "
    "template that renders earlier turns verbatim, or accept one row per call",
    HISTORY_REWRITTEN: "the messages do not extend an earlier turn (a message was edited or dropped, or the "
    "assistant's reply was not sent back as the gateway returned it); fix: append to the conversation and send "
    "earlier messages back unchanged",
}
"""Why a call did not extend its rollout's earlier turn (``PromptPlan.fork_cause``), each with its fix."""


@dataclass(frozen=True)
class SessionKey:
    """Which conversation state a call belongs to: one attempt of one rollout."""

    rollout_id: str
    attempt_no: int


@dataclass(frozen=True)
class PromptPlan:
    """The prompt for one request: its ids, the text they stand for, and whether an earlier turn was reused.

    ``raw_assistant`` are the raw texts used to render the gateway's own earlier assistant messages (by
    message index); they are remembered with the turn so later turns render those messages the same way.
    """

    prompt_ids: list[int]
    prompt_text: str
    prefix_reused: bool
    raw_assistant: dict[int, str] = field(default_factory=dict)
    tools: tuple[str, ...] = ()
    """The tools the prompt was rendered with (canonical JSON; a later call with others forks)."""
    fork_cause: str | None = None
    """Why an earlier turn of the same conversation was not reused (a key of :data:`FORK_CAUSES`), else None."""


@dataclass(frozen=True)
class _Turn:
    context: tuple[MessageKey, ...]  # the messages before the assistant message this turn produced
    reply: MessageKey  # that assistant message, as the agent will send it back
    raw_assistant: dict[int, str]  # raw texts of gateway-made messages in context + reply
    ids: tuple[int, ...]  # prompt + completion (+ turn closing) ids
    text: str  # the text those ids stand for
    tools: tuple[str, ...] = ()  # the tools it was rendered with (canonical JSON), to name a fork's cause


@dataclass
class _Session:
    attempt_no: int
    turns: deque[_Turn]
    warned: bool = False  # a fork of this rollout was logged at WARNING already


def _tools_key(tools: Sequence[ToolSpec] | None) -> tuple[str, ...]:
    return tuple(tool.model_dump_json(exclude_none=True) for tool in tools or ())


class SessionStore:
    """Sessions of all rollouts served by one gateway, for one chat format."""

    def __init__(self, chat_format: ChatFormat, *, max_sessions: int = 256, max_turns: int = 32) -> None:
        if max_sessions < 1 or max_turns < 1:
            raise ValueError(f"max_sessions and max_turns must be >= 1, got {max_sessions} and {max_turns}")
        self.chat_format = chat_format
        self.max_sessions = max_sessions
        self.max_turns = max_turns
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._lock = threading.Lock()

    def plan(
        self,
        key: SessionKey | None,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec] | None,
        *,
        continue_final_message: bool = False,
    ) -> PromptPlan:
        """The prompt ids for ``messages``, reusing the longest matching earlier turn of ``key``'s session
        (``key=None``: a call outside any rollout, tokenised from scratch)."""
        fmt = self.chat_format
        keys = [message.key() for message in messages]
        tools_key = _tools_key(tools)
        match, latest = self._longest_match(key, keys) if key else (None, None)
        raw = dict(match.raw_assistant) if match else {}
        text = fmt.render(messages, tools, raw_assistant=raw, continue_final_message=continue_final_message)
        if match is not None and text.startswith(match.text):
            ids = list(match.ids) + fmt.tokenize(text[len(match.text) :])
            return PromptPlan(prompt_ids=ids, prompt_text=text, prefix_reused=True, raw_assistant=raw,
                              tools=tools_key)
        cause = _fork_cause(match, latest, keys, tools_key)
        if cause is not None and key is not None:
            self._report_fork(key, cause)
        return PromptPlan(
            prompt_ids=fmt.tokenize(text), prompt_text=text, prefix_reused=False, raw_assistant=raw,
            tools=tools_key, fork_cause=cause,
        )

    def _report_fork(self, key: SessionKey, cause: str) -> None:
        """Log the first fork of a rollout at WARNING with its fix; later ones at DEBUG."""
        with self._lock:
            session = self._sessions.get(key.rollout_id)
            first = session is not None and not session.warned
            if session is not None:
                session.warned = True
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "rollout %s: this call does not extend the rollout's earlier turn, so its tokens start a new training "
            "row (counted in adapter/fork_causes/%s): %s%s", key.rollout_id, cause, FORK_CAUSES[cause],
            " (logged once per rollout)" if first else "",
        )

    def record(
        self,
        key: SessionKey,
        messages: Sequence[ChatMessage],
        plan: PromptPlan,
        completion_ids: Sequence[int],
        reply: MessageKey,
        *,
        continue_final_message: bool = False,
    ) -> None:
        """Remember one served choice: ``completion_ids`` as sampled (stop-string truncated) and ``reply``, the
        assistant message returned for it (for a continued message, the continuation only)."""
        fmt = self.chat_format
        keys = [message.key() for message in messages]
        ended = bool(completion_ids) and completion_ids[-1] in fmt.end_of_turn_ids
        body_ids = list(completion_ids[:-1] if ended else completion_ids)
        continuation = fmt.decode(body_ids, skip_special_tokens=False)
        if ended:
            closing_ids: list[int] = []
            closing = fmt.decode(completion_ids[-1:], skip_special_tokens=False)
        else:
            closing_ids, closing = fmt.turn_closing_ids, fmt.turn_closing
        raw_reply = continuation
        if continue_final_message:
            # The continued message is the partial one plus the continuation: that is what the agent sends next.
            partial = keys.pop()
            reply = MessageKey(role="assistant", text=partial.text + reply.text, calls=reply.calls)
            raw_reply = plan.raw_assistant.get(len(keys), partial.text) + continuation
        turn = _Turn(
            context=tuple(keys),
            reply=reply,
            raw_assistant={**plan.raw_assistant, len(keys): raw_reply},
            ids=(*plan.prompt_ids, *completion_ids, *closing_ids),
            text=plan.prompt_text + continuation + closing,
            tools=plan.tools,
        )
        with self._lock:
            session = self._sessions.get(key.rollout_id)
            if session is None or session.attempt_no != key.attempt_no:
                session = _Session(attempt_no=key.attempt_no, turns=deque(maxlen=self.max_turns))
                self._sessions[key.rollout_id] = session
            session.turns.append(turn)
            self._sessions.move_to_end(key.rollout_id)
            while len(self._sessions) > self.max_sessions:
                dropped, _ = self._sessions.popitem(last=False)
                logger.debug("session of rollout %s dropped (least recently used)", dropped)

    def drop(self, rollout_id: str) -> None:
        """Forget a rollout's session (its rollout finished); unknown ids are ignored."""
        with self._lock:
            self._sessions.pop(rollout_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _longest_match(self, key: SessionKey, keys: list[MessageKey]) -> tuple[_Turn | None, _Turn | None]:
        """The turn with the longest context such that ``keys`` starts with its context followed by its reply,
        and the session's latest turn (to name the cause when none matches)."""
        with self._lock:
            session = self._sessions.get(key.rollout_id)
            if session is None or session.attempt_no != key.attempt_no:
                return None, None
            self._sessions.move_to_end(key.rollout_id)
            best: _Turn | None = None
            for turn in session.turns:
                k = len(turn.context)
                longer = best is None or k > len(best.context)
                if longer and len(keys) > k and keys[k] == turn.reply and tuple(keys[:k]) == turn.context:
                    best = turn
            return best, (session.turns[-1] if session.turns else None)


def _fork_cause(
    match: _Turn | None, latest: _Turn | None, keys: list[MessageKey], tools: tuple[str, ...]
) -> str | None:
    """Why a call did not reuse an earlier turn: its messages extend ``match`` but the rendering differs (tools,
    else the template), or they match none but continue the same conversation as ``latest`` (its first user
    message: the system prompt or a later message changed). ``None``: the first call, or another conversation."""
    if match is not None:
        return TOOLS_DIFFER if match.tools != tools else TEMPLATE_RERENDERS
    if latest is None:
        return None
    earlier = [*latest.context, latest.reply]
    if _first_user(earlier) is None or _first_user(earlier) != _first_user(keys):
        return None
    system = [k for k in keys if k.role == "system"][:1]
    earlier_system = [k for k in earlier if k.role == "system"][:1]
    return SYSTEM_DIFFERS if system != earlier_system else HISTORY_REWRITTEN


def _first_user(keys: Sequence[MessageKey]) -> MessageKey | None:
    return next((k for k in keys if k.role == "user"), None)
