"""A loopback Hugging Face Hub: serves a directory tree `root/{owner}/{repo}/...` as Hub model repositories.

Ember's hub client (`ember.hub`) goes through `huggingface_hub`, so this server answers the routes that library
calls for a listing and a download, with the headers it reads:

- `GET /api/models/{owner}/{repo}[/revision/{rev}]`: `id`, `sha` (the commit) and `siblings`; with `?blobs=true`
  each sibling also has `size`, `blobId` (the git blob id) and, for LFS files, `lfs: {size, sha256, pointerSize}`.
- `HEAD`/`GET /{owner}/{repo}/resolve/{rev}/{path}`: `X-Repo-Commit`, a quoted `ETag` (the sha256 for LFS files,
  the git blob id otherwise), `X-Linked-Etag` and `X-Linked-Size` for LFS files, `Content-Length`, and `Range`
  requests answered with 206 so an interrupted download can resume.
- Errors as the Hub spells them: 404 with `X-Error-Code: RepoNotFound`, `RevisionNotFound` or `EntryNotFound`, and
  401 with `RepoNotFound` for a private repository asked for without its token.

The revision is `main` or the commit, a hash of the files' names and digests, so it changes when a file does.
Tests read `requests` (to check that a token was sent, or that a second fetch downloaded nothing) and ask for
faults: `drop_after` cuts a download mid-file (a clean close, which the client resumes with a `Range` request,
or a reset, which it does not), `corrupt` serves a file's bytes inverted under its true digest, and `add_sibling`
lists a file that is not there (a hostile name, say). The server is HTTP/1.0, one connection per request, so a
fault never leaves a half-read connection in the client's pool.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".onnx", ".h5", ".msgpack", ".model", ".png", ".jpg")
"""Files the Hub's default `.gitattributes` stores with Git LFS (a sha256 in the listing and the ETag)."""
LFS_MIN_SIZE = 10 * 1024 * 1024
"""The Hub stores any file at least this large with LFS, whatever its name."""
LFS_POINTER_SIZE = 134
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_MODEL_ROUTE = re.compile(r"/api/models/(?P<owner>[^/]+)/(?P<repo>[^/]+)(?:/revision/(?P<rev>[^/]+))?/?\Z")
_RESOLVE_ROUTE = re.compile(r"/(?P<owner>[^/]+)/(?P<repo>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)\Z")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)\Z")
_CHUNK = 64 * 1024
_INVERT = bytes(255 - i for i in range(256))


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # unquoted URL path
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def range(self) -> str | None:
        return self.headers.get("range")

    @property
    def is_download(self) -> bool:
        """A GET of a file's bytes (a HEAD only asks for its metadata)."""
        return self.method == "GET" and "/resolve/" in self.path


@dataclass(frozen=True)
class RepoFile:
    name: str  # path inside the repository, with `/`
    size: int
    sha256: str
    git_oid: str  # git's blob id: sha1 of `blob {size}\0` and the bytes
    lfs: bool

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid

    def sibling(self, blobs: bool) -> dict:
        entry: dict = {"rfilename": self.name}
        if blobs:
            entry.update(size=self.size, blobId=self.git_oid)
            if self.lfs:
                entry["lfs"] = {"size": self.size, "sha256": self.sha256, "pointerSize": LFS_POINTER_SIZE}
        return entry


@dataclass
class _Drop:
    after: int  # body bytes sent before the connection goes
    times: int
    reset: bool


@dataclass
class _Faults:
    private: dict[str, str] = field(default_factory=dict)  # repo id -> token
    drops: dict[tuple[str, str], _Drop] = field(default_factory=dict)
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    extra: dict[str, list[dict]] = field(default_factory=dict)  # repo id -> sibling entries


def _digests(path: Path) -> tuple[str, str]:
    """sha256 and git blob id of a file, in one pass."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(f"blob {size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


class HubServer:
    """The loopback Hub, a context manager: `with HubServer(root) as hub: hub.url`."""

    def __init__(self, root: Path | str, host: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self._host = host
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._faults = _Faults()
        self._digest_cache: dict[tuple[str, int, int], tuple[str, str]] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((self._host, 0), handler)
        self._httpd.daemon_threads = True
        # A short poll interval: `stop` waits for the serving loop to notice, and tests stop a server each.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- what tests read and ask for ---------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def downloads(self, name: str | None = None) -> list[RecordedRequest]:
        """The GETs of file bytes so far, of one file (a path inside its repository) or of any."""
        return [r for r in self.requests if r.is_download and (name is None or r.path.endswith("/" + name))]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def make_private(self, repo_id: str, token: str) -> None:
        """Answer 401 for the repository unless the request carries `Authorization: Bearer {token}`."""
        with self._lock:
            self._faults.private[repo_id] = token

    def drop_after(self, repo_id: str, name: str, after: int, *, times: int = 1, reset: bool = False) -> None:
        """Cut the next `times` downloads of a file after `after` body bytes: with a clean close, or a TCP reset."""
        with self._lock:
            self._faults.drops[(repo_id, name)] = _Drop(after, times, reset)

    def corrupt(self, repo_id: str, name: str, on: bool = True) -> None:
        """Serve the file's bytes inverted (same size, same advertised digest) until turned off."""
        with self._lock:
            (self._faults.corrupt.add if on else self._faults.corrupt.discard)((repo_id, name))

    def add_sibling(self, repo_id: str, name: str, size: int = 1, sha256: str = "0" * 64) -> None:
        """List a file the repository does not hold (its download answers EntryNotFound)."""
        entry = {"rfilename": name, "size": size, "blobId": "0" * 40}
        entry["lfs"] = {"size": size, "sha256": sha256, "pointerSize": LFS_POINTER_SIZE}
        with self._lock:
            self._faults.extra.setdefault(repo_id, []).append(entry)

    # -- repository contents -----------------------------------------------------------------------------------------

    def repo_dir(self, owner: str, repo: str) -> Path | None:
        """The folder of a repository, or None when the id is not a valid, existing one."""
        if not (_PART.match(owner) and _PART.match(repo)) or ".." in owner + repo:
            return None
        directory = self.root / owner / repo
        return directory if directory.is_dir() else None

    def files(self, directory: Path) -> dict[str, RepoFile]:
        listing = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            name = path.relative_to(directory).as_posix()
            stat = path.stat()
            key = (str(path), stat.st_size, stat.st_mtime_ns)
            with self._lock:
                digests = self._digest_cache.get(key)
            if digests is None:
                digests = _digests(path)
                with self._lock:
                    self._digest_cache[key] = digests
            lfs = name.lower().endswith(LFS_SUFFIXES) or stat.st_size >= LFS_MIN_SIZE
            listing[name] = RepoFile(name, stat.st_size, digests[0], digests[1], lfs)
        return listing

    @staticmethod
    def commit(files: dict[str, RepoFile]) -> str:
        text = "\n".join(f"{f.name} {f.sha256}" for f in files.values())
        return hashlib.sha1(text.encode()).hexdigest()

    # -- used by the handler -----------------------------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _private_token(self, repo_id: str) -> str | None:
        with self._lock:
            return self._faults.private.get(repo_id)

    def _extra(self, repo_id: str) -> list[dict]:
        with self._lock:
            return list(self._faults.extra.get(repo_id, []))

    def _take_drop(self, repo_id: str, name: str) -> _Drop | None:
        with self._lock:
            drop = self._faults.drops.get((repo_id, name))
            if drop is None:
                return None
            drop.times -= 1
            if drop.times <= 0:
                del self._faults.drops[(repo_id, name)]
            return drop

    def _is_corrupt(self, repo_id: str, name: str) -> bool:
        with self._lock:
            return (repo_id, name) in self._faults.corrupt


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.0"
    server_version = "ember-hub-server"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class names it so
        """Quiet: tests read `HubServer.requests` instead."""

    def do_GET(self) -> None:
        self._route(send_body=True)

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def _route(self, send_body: bool) -> None:
        split = urlsplit(self.path)
        self.hub._record(
            RecordedRequest(
                method=self.command,
                path=unquote(split.path),
                query=parse_qs(split.query),
                headers={k.lower(): v for k, v in self.headers.items()},
            )
        )
        if match := _MODEL_ROUTE.match(split.path):
            self._model_info(match, parse_qs(split.query), send_body)
        elif match := _RESOLVE_ROUTE.match(split.path):
            self._resolve(match, send_body)
        else:
            self._error(404, "EntryNotFound", "no such route", send_body)

    def _repo(self, match: re.Match, send_body: bool) -> tuple[str, Path] | None:
        """The repository a route names, after the checks the Hub makes (exists, token); None once answered."""
        owner, repo = unquote(match["owner"]), unquote(match["repo"])
        repo_id = f"{owner}/{repo}"
        directory = self.hub.repo_dir(owner, repo)
        if directory is None:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return None
        token = self.hub._private_token(repo_id)
        if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
            sent = self.headers.get("Authorization") is not None
            message = "Invalid credentials in Authorization header" if sent else "Invalid username or password."
            self._error(401, "RepoNotFound", message, send_body)
            return None
        return repo_id, directory

    def _model_info(self, match: re.Match, query: dict, send_body: bool) -> None:
        found = self._repo(match, send_body)
        if found is None:
            return
        repo_id, directory = found
        files = self.hub.files(directory)
        commit = self.hub.commit(files)
        if match["rev"] is not None and unquote(match["rev"]) not in ("main", commit):
            self._error(404, "RevisionNotFound", "Invalid rev id", send_body)
            return
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [f.sibling(blobs) for f in files.values()] + self.hub._extra(repo_id)
        body = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit,
            "private": self.hub._private_token(repo_id) is not None,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def _resolve(self, match: re.Match, send_body: bool) -> None:
        found = self._repo(match, send_body)
        if found is None:
            return
        repo_id, directory = found
        files = self.hub.files(directory)
        commit = self.hub.commit(files)
        if unquote(match["rev"]) not in ("main", commit):
            self._error(404, "RevisionNotFound", "Invalid rev id", send_body)
            return
        entry = files.get(unquote(match["file"]))
        if entry is None:
            self._error(404, "EntryNotFound", "Entry not found", send_body, commit=commit)
            return
        start, end = self._byte_range(entry.size)
        if start is None:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{entry.size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if self.headers.get("Range") else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{entry.etag}"')
        self.send_header("X-Repo-Commit", commit)
        if entry.lfs:
            self.send_header("X-Linked-Etag", f'"{entry.sha256}"')
            self.send_header("X-Linked-Size", str(entry.size))
        if self.headers.get("Range"):
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{entry.size}")
        self.end_headers()
        if send_body:
            self._send_file(repo_id, directory / entry.name, entry.name, start, end)

    def _byte_range(self, size: int) -> tuple[int | None, int]:
        """`(start, end)` of the body to send; start None when the range cannot be satisfied."""
        header = self.headers.get("Range")
        if not header:
            return 0, size
        match = _RANGE.match(header.strip())
        if match is None or int(match[1]) >= size:
            return None, size
        end = min(int(match[2]) + 1, size) if match[2] else size
        return int(match[1]), end

    def _send_file(self, repo_id: str, path: Path, name: str, start: int, end: int) -> None:
        drop = self.hub._take_drop(repo_id, name)
        budget = drop.after if drop is not None else end - start
        corrupt = self.hub._is_corrupt(repo_id, name)
        for chunk in _read(path, start, end):
            piece = chunk[:budget]
            self.wfile.write(piece.translate(_INVERT) if corrupt else piece)
            budget -= len(piece)
            if budget <= 0:
                break
        if drop is not None:
            self._cut(drop.reset)

    def _cut(self, reset: bool) -> None:
        """End the connection before the body is complete: a FIN (clean close) or an RST (SO_LINGER 0)."""
        self.wfile.flush()
        if reset:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def _error(self, status: int, code: str, message: str, send_body: bool, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit is not None:
            self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if send_body:
            self.wfile.write(data)


def _read(path: Path, start: int, end: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(start)
        left = end - start
        while left > 0 and (chunk := f.read(min(_CHUNK, left))):
            left -= len(chunk)
            yield chunk
