"""Local HTTP servers that speak the Hugging Face Hub's and the Ollama registry's protocols
(the parts `kvslim pull` uses), so pulls are tested without a network.

    with FakeServer() as s:
        hub = FakeHub(s); hub.add("user/repo", {"model.Q4_K_M.gguf": data})
        registry = FakeRegistry(s); registry.add("library/tiny", "latest", data, template=...)

Files are served with Range support; ``cut[path] = n`` makes the next answer for ``path``
stop after n bytes (the connection closes mid-body), ``slow[path] = s`` sends it 64 KiB
every s seconds; every request is logged.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.json: dict[str, object] = {}
        self.redirects: dict[str, str] = {}
        self.cut: dict[str, int] = {}
        self.slow: dict[str, float] = {}  # path -> seconds to wait before each 64 KiB sent
        self.log: list[tuple[str, dict]] = []  # (path, headers with lower-case names)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                path = self.path.split("?", 1)[0]
                if path in server.redirects:
                    self.send_response(307)
                    self.send_header("Location", server.redirects[path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path in server.json:
                    body = json.dumps(server.json[path]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif path in server.files:
                    self.send_file(server.files[path], server.cut.pop(path, None),
                                   server.slow.get(path, 0.0))
                else:
                    body = json.dumps({"error": "file does not exist"}).encode()
                    self.send_response(404)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("X-Error-Code", "RepoNotFound")  # the Hub's header
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def send_file(self, data: bytes, cut: int | None, slow: float):
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                body = body if cut is None else body[:cut]
                step = 1 << 16 if slow else max(len(body), 1)
                try:
                    for i in range(0, len(body), step):
                        time.sleep(slow)
                        self.wfile.write(body[i:i + step])
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):  # the client left
                    self.close_connection = True
                    return
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def paths(self) -> list[str]:
        return [p for p, _ in self.log]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """The Hub's model info (``/api/models/REPO``, files with their LFS sha256) and
    ``/REPO/resolve/REVISION/FILE`` downloads."""

    REVISION = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, server: FakeServer):
        self.server = server

    def add(self, repo: str, files: dict[str, bytes], wrong_sha: bool = False) -> None:
        siblings = [{"rfilename": "README.md", "size": 5}]
        for name, data in files.items():
            digest = sha(data + b"x") if wrong_sha else sha(data)
            siblings.append({"rfilename": name, "size": len(data),
                             "lfs": {"size": len(data), "sha256": digest, "pointerSize": 134}})
            self.server.files[f"/{repo}/resolve/{self.REVISION}/{name}"] = data
        info = {"id": repo, "modelId": repo, "sha": self.REVISION, "private": False,
                "siblings": siblings}
        self.server.json[f"/api/models/{repo}"] = info
        self.server.json[f"/api/models/{repo}/revision/main"] = info

    def file_path(self, repo: str, name: str) -> str:
        return f"/{repo}/resolve/{self.REVISION}/{name}"


class FakeRegistry:
    """The Ollama registry: ``/v2/NS/MODEL/manifests/TAG`` and ``/v2/NS/MODEL/blobs/DIGEST``,
    blobs answered with a redirect to a CDN path, as the real registry does."""

    def __init__(self, server: FakeServer):
        self.server = server

    def blob(self, repo: str, data: bytes, served: bytes | None = None) -> str:
        digest = f"sha256:{sha(data)}"
        cdn = f"/cdn/{sha(data)}"
        self.server.redirects[f"/v2/{repo}/blobs/{digest}"] = self.server.url + cdn
        self.server.files[cdn] = data if served is None else served
        return digest

    def add(self, repo: str, tag: str, model: bytes, served: bytes | None = None,
            **layers: str) -> str:
        """A manifest with the model layer and text layers (template=, params=, system=,
        license=, or any media type suffix); the model layer's digest."""
        digest = self.blob(repo, model, served)
        entries = [{"mediaType": "application/vnd.ollama.image.model", "digest": digest,
                    "size": len(model)}]
        for kind, text in layers.items():
            data = text.encode()
            entries.append({"mediaType": f"application/vnd.ollama.image.{kind}",
                            "digest": self.blob(repo, data), "size": len(data)})
        self.server.json[f"/v2/{repo}/manifests/{tag}"] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": "sha256:" + "0" * 64, "size": 2},
            "layers": entries,
        }
        return digest
