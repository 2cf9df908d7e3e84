"""A local stand-in for the Hugging Face hub's HTTP API, enough for huggingface_hub's snapshot_download.

Serves one model repo from a dict {path: bytes}: repo info, the recursive file tree, HEAD/GET on
/resolve/ with Range requests (resume). Every request is logged, so tests can assert which files were
fetched and that a cached model causes no traffic at all. `cut_after` makes every GET of a file drop the
connection after that many bytes (until removed), to test resuming an interrupted download; `slow` files
trickle out, to interrupt a download by hand.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id, self.files = repo_id, files
        self.log: list[tuple[str, str, str]] = []  # (method, path, range header)
        self.cut_after: dict[str, int] = {}
        self.slow: set[str] = set()  # files sent in 64 kB pieces, 50 ms apart
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def fetched(self) -> list[str]:
        """Files whose bytes were requested (GET on /resolve/)."""
        return [p.split(f"/resolve/{COMMIT}/", 1)[1] for m, p, _ in self.log if m == "GET" and "/resolve/" in p]

    def _serve(self, h: BaseHTTPRequestHandler, body: bool):
        path = unquote(urlparse(h.path).path)
        self.log.append((h.command, path, h.headers.get("Range", "")))
        api = f"/api/models/{self.repo_id}"
        if path.startswith(f"{api}/revision/"):
            siblings = [{"rfilename": p} for p in self.files]
            return self._json(h, {"id": self.repo_id, "sha": COMMIT, "siblings": siblings, "private": False}, body)
        if path.startswith(f"{api}/tree/"):
            tree = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest(),
                     "lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 130}}
                    for p, b in self.files.items()]
            return self._json(h, tree, body)
        prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix):].split("/", 1)[1]
            if name not in self.files:
                return self._error(h, 404, "EntryNotFound")
            return self._file(h, name, body)
        return self._error(h, 404, "RepoNotFound")

    def _json(self, h, obj, body):
        data = json.dumps(obj).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _error(self, h, code, kind):
        data = json.dumps({"error": kind}).encode()
        h.send_response(code)
        h.send_header("X-Error-Code", kind)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _file(self, h, name, body):
        data = self.files[name]
        start = 0
        rng = h.headers.get("Range", "")
        if rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        part = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(part)))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        cut = self.cut_after.get(name)
        if cut is not None:
            h.wfile.write(part[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)
            return
        if name in self.slow:
            import time

            for i in range(0, len(part), 1 << 16):
                h.wfile.write(part[i:i + (1 << 16)])
                h.wfile.flush()
                time.sleep(0.05)
            return
        h.wfile.write(part)
