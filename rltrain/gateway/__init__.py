"""The gateway: rltrain's OpenAI-compatible server in front of an engine (design decisions 1, 2 and 4).

It applies the chat template and tokenises itself, reuses each rollout's earlier token ids verbatim
(:mod:`~rltrain.gateway.sessions`), parses the one tool-call format (:mod:`~rltrain.gateway.tool_calls`), and
records every completion of a rollout as an llm span in the store.
"""

from rltrain.gateway.app import create_app
from rltrain.gateway.chat_format import ChatFormat, ChatFormatError
from rltrain.gateway.completions import ChatService
from rltrain.gateway.errors import GatewayError
from rltrain.gateway.server import GatewayServer, InsecureBindError
from rltrain.gateway.tool_calls import ParsedOutput, ToolCall, parse_tool_calls

__all__ = [
    "ChatFormat",
    "ChatFormatError",
    "ChatService",
    "GatewayError",
    "GatewayServer",
    "InsecureBindError",
    "ParsedOutput",
    "ToolCall",
    "create_app",
    "parse_tool_calls",
]
