"""A scripted OpenAI-compatible chat server for APO tests: deterministic critiques and edits over real HTTP.

It stands in for the critic and editor LLMs, which are outside the code under test (APO calls whatever endpoint
the recipe names). Requests for model ``critic`` get ``critique``; requests for model ``editor`` get the next
reply scripted for the parent template found in the request, so the replies do not depend on the order in which
parents are visited, and a fresh server replays the same script after an interruption.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class ScriptedLLM:
    def __init__(self, critique: str, edits: dict[str, list[str]], fail_on_edit: int | None = None) -> None:
        self.critique = critique
        self.edits = edits
        self.fail_on_edit = fail_on_edit
        self.requests: list[dict[str, Any]] = []
        self._served: dict[str, int] = defaultdict(int)
        self._edit_calls = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reply(self, body: dict[str, Any]) -> tuple[int, str]:
        with self._lock:
            self.requests.append(body)
            if body["model"] == "critic":
                return 200, self.critique
            self._edit_calls += 1
            if self.fail_on_edit is not None and self._edit_calls == self.fail_on_edit:
                return 400, "scripted failure"
            text = body["messages"][-1]["content"]
            parent = max((t for t in self.edits if t in text), key=len)
            replies = self.edits[parent]
            index = self._served[parent]
            self._served[parent] += 1
            return 200, replies[min(index, len(replies) - 1)]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, text = outer.reply(body)
                if status != 200:
                    payload = {"error": {"message": text, "type": "invalid_request_error"}}
                else:
                    payload = {
                        "id": "scripted", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
                    }
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
