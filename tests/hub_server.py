"""A minimal Hugging Face Hub look-alike on localhost, for testing uploads and downloads offline.

It implements the few endpoints ``HfApi.create_repo`` / ``upload_folder`` (preupload + commit, every
file uploaded inline as a "regular" file) and ``snapshot_download`` (repo info, HEAD/GET resolve)
use, and keeps the repositories in memory.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import threading
from dataclasses import dataclass, field

import yaml


@dataclass
class Repo:
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)
    private: bool = False

    @property
    def sha(self) -> str:
        return self.commits[-1] if self.commits else "0" * 40


class FakeHub:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                hub._dispatch(self, "POST")

            def do_GET(self):
                hub._dispatch(self, "GET")

            def do_HEAD(self):
                hub._dispatch(self, "HEAD")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- routing ------------------------------------------------------------------------------
    ROUTES = [
        ("POST", re.compile(r"^/api/repos/create$"), "_create"),
        ("POST", re.compile(r"^/api/validate-yaml$"), "_validate_yaml"),
        ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$"), "_preupload"),
        ("POST", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$"), "_commit"),
        ("GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$"), "_info"),
        ("GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)$"), "_info"),
        ("GET", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)$"), "_tree"),
        ("GET", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "_resolve"),
        ("HEAD", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "_resolve"),
    ]

    def _dispatch(self, handler, method: str) -> None:
        path = handler.path.split("?", 1)[0]
        with self.lock:
            self.requests.append((method, path))
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        for verb, pattern, name in self.ROUTES:
            match = pattern.match(path)
            if verb == method and match:
                with self.lock:
                    status, headers, payload = getattr(self, name)(body=body, **match.groupdict())
                break
        else:
            status, headers, payload = 404, {}, json.dumps({"error": f"no route {method} {path}"}).encode()
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(payload)

    def _json(self, obj, status: int = 200):
        return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()

    def _missing(self, repo: str):
        headers = {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"}
        return 404, headers, json.dumps({"error": f"Repository {repo} not found"}).encode()

    # ---- endpoints -----------------------------------------------------------------------------
    def _create(self, body: bytes):
        req = json.loads(body)
        repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
        self.repos.setdefault(repo_id, Repo(private=bool(req.get("private"))))
        return self._json({"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes):
        """The README's front matter must be a YAML mapping (the Hub rejects anything else with a 400)."""
        try:
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            data = yaml.safe_load(match.group(1)) if match else {}
        except (yaml.YAMLError, KeyError, ValueError) as err:
            return self._json({"error": f"invalid metadata: {err}"}, 400)
        if not isinstance(data, dict):
            return self._json({"error": "metadata must be a mapping"}, 400)
        return self._json({"errors": [], "warnings": []})

    def _preupload(self, body: bytes, repo: str, rev: str):
        if repo not in self.repos:
            return self._missing(repo)
        files = json.loads(body)["files"]
        return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                     for f in files]})

    def _commit(self, body: bytes, repo: str, rev: str):
        if repo not in self.repos:
            return self._missing(repo)
        target = self.repos[repo]
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                value = item["value"]
                if value.get("encoding") != "base64":
                    return self._json({"error": "only base64 file content is supported"}, 400)
                target.files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "deletedFile":
                target.files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._json({"error": f"unsupported commit item {item['key']}"}, 400)
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in target.files.items()))
                              .encode()).hexdigest()
        target.commits.append(digest)
        return self._json({"commitUrl": f"{self.endpoint}/{repo}/commit/{digest}", "commitOid": digest,
                           "pullRequestUrl": None})

    def _info(self, body: bytes, repo: str, rev: str = "main"):
        if repo not in self.repos:
            return self._missing(repo)
        target = self.repos[repo]
        return self._json({"id": repo, "modelId": repo, "sha": target.sha, "private": target.private,
                           "siblings": [{"rfilename": name} for name in sorted(target.files)]})

    def _tree(self, body: bytes, repo: str, rev: str):
        if repo not in self.repos:
            return self._missing(repo)
        files = self.repos[repo].files
        return self._json([{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                           for name, data in sorted(files.items())])

    def _resolve(self, body: bytes, repo: str, rev: str, path: str):
        target = self.repos.get(repo)
        if target is None:
            return self._missing(repo)
        if path not in target.files:
            return 404, {"X-Error-Code": "EntryNotFound"}, b""
        data = target.files[path]
        etag = hashlib.sha1(data).hexdigest()
        return 200, {"ETag": f'"{etag}"', "X-Repo-Commit": target.sha,
                     "Content-Type": "application/octet-stream"}, data
