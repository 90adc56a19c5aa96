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


@dataclass(frozen=True)
class _Turn:
    context: tuple[MessageKey, ...]  # the messages before the assistant message this turn produced
    reply: MessageKey  # that assistant message, as the agent will send it back
    raw_assistant: dict[int, str]  # raw texts of gateway-made messages in context + reply
    ids: tuple[int, ...]  # prompt + completion (+ turn closing) ids
    text: str  # the text those ids stand for


@dataclass
class _Session:
    attempt_no: int
    turns: deque[_Turn]


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
        match = self._longest_match(key, [message.key() for message in messages]) if key else None
        raw = dict(match.raw_assistant) if match else {}
        text = fmt.render(messages, tools, raw_assistant=raw, continue_final_message=continue_final_message)
        if match is not None and text.startswith(match.text):
            ids = list(match.ids) + fmt.tokenize(text[len(match.text) :])
            return PromptPlan(prompt_ids=ids, prompt_text=text, prefix_reused=True, raw_assistant=raw)
        if match is not None:
            logger.info(
                "the conversation extends an earlier turn but its rendering does not start with that turn's text "
                "(does the template render earlier turns differently?); tokenising the whole prompt"
            )
        return PromptPlan(
            prompt_ids=fmt.tokenize(text), prompt_text=text, prefix_reused=False, raw_assistant=raw
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

    def _longest_match(self, key: SessionKey, keys: list[MessageKey]) -> _Turn | None:
        """The turn with the longest context such that ``keys`` starts with its context followed by its reply."""
        with self._lock:
            session = self._sessions.get(key.rollout_id)
            if session is None or session.attempt_no != key.attempt_no:
                return None
            self._sessions.move_to_end(key.rollout_id)
            best: _Turn | None = None
            for turn in session.turns:
                k = len(turn.context)
                longer = best is None or k > len(best.context)
                if longer and len(keys) > k and keys[k] == turn.reply and tuple(keys[:k]) == turn.context:
                    best = turn
            return best
