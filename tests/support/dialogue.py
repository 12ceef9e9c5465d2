"""A stand-in dialogue server for the hub's fault tests: answers Rasa's webhook and /status on a fixed port,
records each turn, and can be stopped and started again (Rasa going down and coming back)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class WebhookServer:
    """A dialogue server on a fixed port that can be stopped and started again."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.turns: list[dict] = []
        self.headers: list = []  # each turn's request headers (case-insensitive .get)
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _json(self, body: dict) -> None:
                data = json.dumps(body, ensure_ascii=False).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.startswith("/status"):
                    self._json({"model_file": "test.tar.gz", "num_active_training_jobs": 0})
                else:
                    self.send_error(404)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                owner.turns.append(body)
                owner.headers.append(self.headers)
                self._json({
                    "messages": [{"recipient_id": body["sender"], "text": f"（对话服务）收到：{body['message']}",
                                  "custom": {"outcome": "answered", "spoken": "收到"}}],
                    "intent": "greet", "confidence": 0.99, "slots": {},
                })

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.allow_reuse_address = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
