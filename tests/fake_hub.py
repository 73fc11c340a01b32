"""A minimal in-process Hugging Face Hub for push tests.

It speaks just the part of the Hub HTTP API that ``HfApi.create_repo``, ``create_branch`` and
``upload_folder`` use (huggingface_hub 1.x/2.x), and tells the client to send every file inline
("regular" upload mode, base64 in the NDJSON commit), so no LFS / Xet storage is needed. Files land
in memory, so a test can compare them byte for byte with what was pushed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

USER = "tester"


@dataclass
class FakeRepo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)


class FakeHub:
    """``with FakeHub(tokens={"hf_x"}) as hub: ... hub.endpoint ... hub.repos``."""

    def __init__(self, tokens: set[str] | frozenset[str] = frozenset({"hf_test_token"}),
                 forbidden: set[str] | frozenset[str] = frozenset({"someone-else"})) -> None:
        self.tokens = set(tokens)
        self.forbidden = set(forbidden)  # namespaces the token may not write to
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []  # /api/repos/create payloads
        self.validated: list[str] = []  # README.md contents sent to /api/validate-yaml
        self.lock = threading.Lock()
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="fake-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch]

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # ---- plumbing --------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: Any, error_code: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", str(payload.get("error", "")))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in self.fake.tokens

    # ---- routes ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        self.fake.requests.append(("GET", path))
        if path == "/api/whoami-v2":
            if not self._authorized():
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            return self._send(200, {"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})
        self._send(404, {"error": f"no route {path}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        self.fake.requests.append(("POST", path))
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        parts = path.split("/")
        # /api/models/{ns}/{name}/{action}/{revision}
        if len(parts) == 7 and parts[:3] == ["", "api", "models"]:
            repo_id, action, rev = f"{parts[3]}/{parts[4]}", parts[5], unquote(parts[6])
            with self.fake.lock:
                repo = self.fake.repos.get(repo_id)
                if repo is None:
                    return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
                if action == "branch":
                    return self._create_branch(repo, rev)
                if rev not in repo.branches:
                    return self._send(404, {"error": f"Invalid rev id: {rev}"}, "RevisionNotFound")
                if action == "preupload":
                    return self._preupload(json.loads(body))
                if action == "commit":
                    return self._commit(repo_id, repo, rev, body)
        self._send(404, {"error": f"no route {path}"})

    def _create_repo(self, payload: dict[str, Any]) -> None:
        if payload.get("type", "model") != "model":
            return self._send(400, {"error": "only model repos here"})
        self.fake.created.append(payload)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.fake.endpoint}/{repo_id}"
        if repo_id.split("/")[0] in self.fake.forbidden:
            return self._send(403, {"error": "You don't have the rights to create a model under this namespace"})
        with self.fake.lock:
            if repo_id in self.fake.repos:
                return self._send(409, {"error": "You already created this model repo", "url": url})
            self.fake.repos[repo_id] = FakeRepo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._send(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        """Like the Hub, check the model card's front matter before accepting the upload."""
        import yaml

        content = payload.get("content", "")
        errors = []
        if content.startswith("---\n"):
            try:
                meta = yaml.safe_load(content[4:content.index("\n---\n", 4)])
            except (ValueError, yaml.YAMLError) as e:
                meta, errors = None, [{"message": f"front matter is not valid YAML: {e}"}]
            if meta is not None and not isinstance(meta, dict):
                errors.append({"message": "front matter must be a mapping"})
            elif isinstance(meta, dict):
                if not isinstance(meta.get("tags", []), list):
                    errors.append({"message": '"tags" must be an array'})
                for key in ("license", "library_name", "pipeline_tag", "base_model"):
                    if key in meta and not isinstance(meta[key], str):
                        errors.append({"message": f'"{key}" must be a string'})
        self.fake.validated.append(content)
        self._send(400 if errors else 200, {"errors": errors, "warnings": []})

    def _create_branch(self, repo: FakeRepo, branch: str) -> None:
        if branch in repo.branches:
            return self._send(409, {"error": "Reference already exists"})
        repo.branches[branch] = dict(repo.branches["main"])
        self._send(200, {})

    def _preupload(self, payload: dict[str, Any]) -> None:
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                 for f in payload["files"]]
        self._send(200, {"files": files, "commitOid": "0" * 40})

    def _commit(self, repo_id: str, repo: FakeRepo, rev: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._send(400, {"error": "commit payload must start with a header line"})
        staged = dict(repo.branches[rev])
        for item in lines[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    return self._send(400, {"error": "only base64 files"})
                staged[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                staged.pop(value["path"], None)
            else:
                return self._send(400, {"error": f"fake hub does not support {key!r} operations"})
        repo.branches[rev] = staged
        oid = hashlib.sha1(body).hexdigest()
        repo.commits.append({"revision": rev, "summary": lines[0]["value"].get("summary"), "oid": oid,
                             "paths": sorted(v["value"]["path"] for v in lines[1:])})
        self._send(200, {"commitUrl": f"{self.fake.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None})
