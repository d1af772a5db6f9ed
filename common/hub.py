"""Downloads from the Hugging Face Hub for the model registry: one GGUF file of a repository, or the files a
safetensors repository needs to be served.

`hf.co/{owner}/{repo}[:{quant}]` (Ollama's spelling) names a GGUF repository, of which `fetch_gguf` takes the file
of one quantisation; a bare `{owner}/{repo}` names a transformers repository, of which `fetch_repo` takes the config,
the tokenizer, the chat templates and the safetensors weights, never pickles, GGUFs, READMEs or images.

Both go through `huggingface_hub` but read its settings from the environment at each call, where the library reads
some of them once at import: `HF_ENDPOINT` (a mirror, or the loopback hub of the tests), `HF_TOKEN` (sent as a
Bearer token) and `HF_HUB_OFFLINE` (no request at all: files fetched into the same folder before are returned,
checked again if they changed on disk, and anything else is an error).

Nothing is returned unchecked: an LFS file must match the sha256 of the Hub's listing, a small file its git blob id,
and a mismatch deletes the file and raises `HubError`. Downloads are pinned to the commit the listing names, so a
repository that changes mid-fetch cannot mix two versions. An interrupted download never looks complete:
`huggingface_hub` writes to a temporary file, resumes it with a `Range` request when the connection closes mid-file,
deletes it when the call fails, and renames it only when whole. What was checked is kept in `.cache/ember/hub.json`
inside the destination (with the listing, for offline use), so a later fetch neither downloads nor hashes again a
file whose size and mtime have not changed.

Progress: `huggingface_hub` counts bytes on a tqdm class it is given (`tqdm_class`); ours draws nothing and passes
each count on as `progress("download", done, total)`, summed over the call's files, then `progress("hash", ...)`
while the files are checked. It declares `update_transfer`, which makes a Xet download feed it the bytes written
to disk only, not those and the network's as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ember.progress import LogProgress, ProgressFn

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANT = "Q4_K_M"
"""The quantisation Ollama picks when a GGUF repository is named without one (or with `latest`)."""
MANIFEST = Path(".cache") / "ember" / "hub.json"
MAX_REPO_PART = 96

_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?\Z")
_QUANT = re.compile(r"(?<![A-Za-z0-9])((?:I?Q|TQ)[0-9](?:_[A-Za-z0-9]+)*|BF16|F16|F32)(?![A-Za-z0-9])", re.I)
_SPLIT_GGUF = re.compile(r"(?P<stem>.+)-(?P<part>[0-9]{5})-of-(?P<count>[0-9]{5})\.gguf\Z", re.I)
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)
_TEMPLATE_FILES = frozenset({"chat_template.jinja", "chat_template.json"})
_TEMPLATE_FOLDER = "additional_chat_templates/"
_INDEX = "model.safetensors.index.json"
_HASH_CHUNK = 1 << 20


class HubError(RuntimeError):
    """A fetch from the Hub that failed, with a message meant for the operator."""


class RepoNotFound(HubError):
    """The Hub has no such repository (or none this token may see without saying so): a 404 for clients."""


class InvalidRepoIdError(HubError, ValueError):
    """A repository id that cannot name a Hub repository; refused before any request or path is made of it."""


@dataclass(frozen=True)
class HubFile:
    name: str  # path inside the repository, e.g. "model.safetensors" or "tiny-Q4_K_M.gguf"
    path: Path  # where it now lies inside dest_dir
    sha256: str  # hex, checked against the Hub's LFS sha256 where it gives one
    size: int


@dataclass(frozen=True)
class _Remote:
    """One file as the Hub lists it; sha256 for LFS files, the git blob id for the others."""

    name: str
    size: int | None = None
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class _Listing:
    repo_id: str
    commit: str
    files: dict[str, _Remote]


@dataclass
class _Checked:
    """A file as last checked on disk: its size and mtime tell whether it may have changed since."""

    size: int
    mtime_ns: int
    sha256: str
    git_oid: str | None = None


@dataclass
class _Manifest:
    repo_id: str | None = None
    listing: dict | None = None
    checked: dict[str, _Checked] = field(default_factory=dict)


@dataclass(frozen=True)
class _Settings:
    endpoint: str
    token: str | None
    offline: bool


# -- the public calls ----------------------------------------------------------------------------------------------


def fetch_gguf(repo_id: str, quant: str | None, dest_dir: Path, progress: ProgressFn | None = None) -> list[HubFile]:
    """The GGUF file of one quantisation from a repository (all its parts if it is split), checked, in dest_dir."""
    check_repo_id(repo_id)
    settings, root = _settings(), _dest(dest_dir)
    listing = _listing(repo_id, settings, root)
    return _fetch(listing, pick_gguf(list(listing.files), quant, repo_id), root, settings, progress)


def fetch_repo(repo_id: str, dest_dir: Path, progress: ProgressFn | None = None) -> list[HubFile]:
    """The files of a safetensors repository that serving needs, checked, in dest_dir."""
    check_repo_id(repo_id)
    settings, root = _settings(), _dest(dest_dir)
    listing = _listing(repo_id, settings, root)
    names = repo_files(list(listing.files), repo_id)
    if _INDEX in names:
        # The index says which shards make the model: a repository may also hold another copy of the weights
        # (Mistral's consolidated.safetensors), which is not worth gigabytes.
        (index,) = _fetch(listing, [_INDEX], root, settings, lambda *_: None)
        names = _with_indexed_shards(names, index.path, listing, repo_id)
    return _fetch(listing, names, root, settings, progress)


def check_repo_id(repo_id: object) -> str:
    """`owner/repo` as the Hub allows it; anything else (`..`, a path, NUL, `--`) raises InvalidRepoIdError."""
    if not isinstance(repo_id, str):
        raise InvalidRepoIdError(f"a Hub repository id is a string, not {type(repo_id).__name__}")
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise InvalidRepoIdError(f"Hub repository id {repo_id!r} must be owner/repo")
    for part in parts:
        if not _REPO_PART.match(part) or len(part) > MAX_REPO_PART:
            raise InvalidRepoIdError(
                f"Hub repository id {repo_id!r}: each part is 1 to {MAX_REPO_PART} letters, digits, '.', '_' or"
                " '-', starting and ending with a letter or digit"
            )
        if ".." in part or "--" in part:
            raise InvalidRepoIdError(f"Hub repository id {repo_id!r} may not contain '..' or '--'")
    return repo_id


# -- which files -----------------------------------------------------------------------------------------------------


def pick_gguf(names: list[str], quant: str | None, repo_id: str = "the repository") -> list[str]:
    """The GGUF file (or the parts of a split one) whose name carries `quant`; None or `latest` is Q4_K_M if there
    is one, else the only or first file. A quant that appears as a whole word wins, the shortest name first (an
    `-imatrix` variant loses to the plain one); failing that, one name that merely contains it; else HubError."""
    models = _gguf_models(names)
    if not models:
        raise HubError(f"{repo_id} holds no GGUF file")
    default = quant is None or quant.lower() == "latest"
    wanted = DEFAULT_QUANT if default else quant
    whole = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(wanted)}(?![A-Za-z0-9_])", re.I)
    exact = sorted((k for k in models if whole.search(k)), key=lambda k: (len(k), k))
    if exact:
        return _whole(models[exact[0]], repo_id)
    if default:
        return _whole(models[sorted(models)[0]], repo_id)
    loose = sorted(k for k in models if wanted.lower() in k.lower())
    if len(loose) == 1:
        return _whole(models[loose[0]], repo_id)
    what = (
        f"{len(loose)} GGUF files match {quant!r} ({', '.join(loose)})" if loose else f"no GGUF file matches {quant!r}"
    )
    raise HubError(f"{repo_id}: {what}; its quantisations: {', '.join(available_quants(names)) or 'none named'}")


def _whole(files: list[str], repo_id: str) -> list[str]:
    """A split GGUF must be listed with all its parts: a missing one would only fail later, at load."""
    split = _SPLIT_GGUF.match(files[0])
    if split and len(files) != int(split["count"]):
        raise HubError(f"{repo_id} lists {len(files)} of the {int(split['count'])} parts of {files[0]}")
    return files


def available_quants(names: list[str]) -> list[str]:
    """The quantisations a repository's GGUF files are named after (a file name where none can be read)."""
    found = set()
    for key in _gguf_models(names):
        match = _QUANT.search(key.rsplit("/", 1)[-1])
        found.add(match[1].upper() if match else key)
    return sorted(found)


def _gguf_models(names: list[str]) -> dict[str, list[str]]:
    """GGUF models by name (a split model under its first part's name without the part number), each with its
    files in order; multimodal projectors (`mmproj-*`) and hidden files are no model."""
    models: dict[str, list[str]] = {}
    for name in sorted(names):
        base = name.rsplit("/", 1)[-1]
        if not name.lower().endswith(".gguf") or base.lower().startswith("mmproj") or _hidden(name):
            continue
        split = _SPLIT_GGUF.match(name)
        key = f"{split['stem']}-of-{split['count']}.gguf" if split else name
        models.setdefault(key, []).append(name)
    return models


def repo_files(names: list[str], repo_id: str = "the repository") -> list[str]:
    """The files of a transformers repository that serving needs: config.json, generation_config.json, tokenizer
    files, chat templates and the top-level *.safetensors with their index. Raises HubError without config or
    safetensors weights."""
    chosen = [name for name in sorted(names) if _wanted(name)]
    if "config.json" not in chosen:
        raise HubError(f"{repo_id} has no config.json: not a transformers model repository (a GGUF one is hf.co/...)")
    if not any(name.endswith(".safetensors") for name in chosen):
        raise HubError(f"{repo_id} has no safetensors weights; Ember does not load pickled (.bin, .pt) weights")
    return chosen


def _wanted(name: str) -> bool:
    if _hidden(name):
        return False
    if name.startswith(_TEMPLATE_FOLDER):
        return "/" not in name[len(_TEMPLATE_FOLDER) :] and name.endswith(".jinja")
    if "/" in name:
        return False
    return (
        name in ("config.json", "generation_config.json", _INDEX)
        or name in _TOKENIZER_FILES
        or name in _TEMPLATE_FILES
        or name.endswith(".safetensors")
    )


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def _with_indexed_shards(names: list[str], index: Path, listing: _Listing, repo_id: str) -> list[str]:
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HubError(f"{repo_id}: {_INDEX} is not a safetensors index ({exc})") from exc
    missing = sorted(s for s in shards if not isinstance(s, str) or s not in listing.files)
    if missing:
        raise HubError(f"{repo_id}: {_INDEX} names shards the repository does not hold: {missing}")
    return [name for name in names if not name.endswith(".safetensors") or name in shards]


# -- settings, destination, listing ---------------------------------------------------------------------------------


def _settings() -> _Settings:
    """Read at each call: the library reads HF_ENDPOINT and HF_HUB_OFFLINE once, when it is imported."""
    endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if not endpoint.startswith(("http://", "https://")):
        raise HubError(f"HF_ENDPOINT={endpoint!r} is not an http(s) URL")
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return _Settings(
        endpoint=endpoint,
        token=os.environ.get("HF_TOKEN") or None,
        offline=offline.strip().upper() in ("1", "ON", "YES", "TRUE"),
    )


def _dest(dest_dir: Path) -> Path:
    root = Path(dest_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def _local_path(root: Path, name: str) -> Path:
    """Where a listed file goes; a name that could leave dest_dir (`..`, absolute, NUL, `\\`) raises HubError."""
    parts = name.split("/")
    if "\0" in name or "\\" in name or any(part in ("", ".", "..") for part in parts):
        raise HubError(f"the hub lists a file with an unsafe name: {name!r}")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root):
        raise HubError(f"the hub lists a file that would land outside the destination: {name!r}")
    return path


def _listing(repo_id: str, settings: _Settings, root: Path) -> _Listing:
    if settings.offline:
        manifest = _load_manifest(root)
        if manifest.repo_id != repo_id or manifest.listing is None:
            raise HubError(f"HF_HUB_OFFLINE is set and {repo_id} was not fetched into {root.name}/ before")
        files = {f["name"]: _Remote(**f) for f in manifest.listing["files"]}
        return _Listing(repo_id, manifest.listing["commit"], files)
    from huggingface_hub import HfApi

    with _translated(repo_id, settings):
        info = HfApi(endpoint=settings.endpoint, token=settings.token).model_info(repo_id, files_metadata=True)
    if not info.sha:
        raise HubError(f"{settings.endpoint} listed {repo_id} without a commit: not a Hub-compatible endpoint?")
    files = {}
    for sibling in info.siblings or []:
        sha256 = sibling.lfs.sha256 if sibling.lfs else None
        files[sibling.rfilename] = _Remote(sibling.rfilename, sibling.size, sha256, sibling.blob_id)
    return _Listing(repo_id, info.sha, files)


# -- fetching and checking ------------------------------------------------------------------------------------------


def _fetch(
    listing: _Listing, names: list[str], root: Path, settings: _Settings, progress: ProgressFn | None
) -> list[HubFile]:
    """Download what is not already checked on disk, check it, and record the listing and the checks."""
    progress = progress or LogProgress()
    paths = {name: _local_path(root, name) for name in names}
    manifest = _load_manifest(root)
    if manifest.repo_id != listing.repo_id:
        manifest = _Manifest(repo_id=listing.repo_id)
    manifest.listing = {"commit": listing.commit, "files": [asdict(f) for f in listing.files.values()]}
    done = {
        name: manifest.checked[name] for name in names if _still_checked(listing.files[name], paths[name], manifest)
    }
    try:
        todo = [name for name in names if name not in done]
        if settings.offline:
            _require_present(todo, paths, listing.repo_id)
        else:
            _download(listing, todo, root, settings, progress)
        for name, checked in _check_all(listing, todo, paths, progress).items():
            manifest.checked[name] = done[name] = checked
    finally:
        _save_manifest(root, manifest)
    return [HubFile(name, paths[name], done[name].sha256, done[name].size) for name in names]


def _still_checked(remote: _Remote, path: Path, manifest: _Manifest) -> bool:
    """Whether the file on disk is the one checked before (same size and mtime) and still the one listed."""
    checked = manifest.checked.get(remote.name)
    if checked is None or not path.is_file():
        return False
    stat = path.stat()
    if (stat.st_size, stat.st_mtime_ns) != (checked.size, checked.mtime_ns):
        return False
    if remote.sha256:
        return checked.sha256 == remote.sha256
    return remote.blob_id is not None and checked.git_oid == remote.blob_id


def _require_present(names: list[str], paths: dict[str, Path], repo_id: str) -> None:
    missing = [name for name in names if not paths[name].is_file()]
    if missing:
        raise HubError(f"HF_HUB_OFFLINE is set and {repo_id} has files not fetched before: {', '.join(missing)}")


def _download(listing: _Listing, names: list[str], root: Path, settings: _Settings, progress: ProgressFn) -> None:
    from huggingface_hub import hf_hub_download

    sizes = [listing.files[name].size for name in names]
    total = None if None in sizes else sum(sizes)
    counter = _ByteCount(lambda done: progress("download", done, total))
    bar = _silent_bar(counter.add)
    if names:
        progress("download", 0, total)
    for name, size in zip(names, sizes):
        with _translated(listing.repo_id, settings, name):
            hf_hub_download(
                listing.repo_id,
                name,
                revision=listing.commit,
                local_dir=root,
                endpoint=settings.endpoint,
                token=settings.token,
                tqdm_class=bar,
            )
        counter.file_done(size)


def _check_all(listing: _Listing, names: list[str], paths: dict[str, Path], progress: ProgressFn) -> dict:
    """Hash each file against the listing; a mismatch deletes that file and raises HubError."""
    total = sum(paths[name].stat().st_size for name in names)
    counter = _ByteCount(lambda done: progress("hash", done, total))
    checked = {}
    for name in names:
        checked[name] = _check(listing.files[name], paths[name], listing.repo_id, counter.add)
        counter.file_done(checked[name].size)
    return checked


def _check(remote: _Remote, path: Path, repo_id: str, on_bytes: Callable[[int], None]) -> _Checked:
    stat = path.stat()
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {stat.st_size}\0".encode()) if not remote.sha256 and remote.blob_id else None
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha256.update(chunk)
            if git is not None:
                git.update(chunk)
            on_bytes(len(chunk))
    checked = _Checked(stat.st_size, stat.st_mtime_ns, sha256.hexdigest(), git.hexdigest() if git else None)
    problem = None
    if remote.size is not None and checked.size != remote.size:
        problem = f"size {checked.size} is not the listed {remote.size}"
    elif remote.sha256 and checked.sha256 != remote.sha256.lower():
        problem = f"sha256 {checked.sha256} does not match the hub's {remote.sha256}"
    elif git is not None and checked.git_oid != remote.blob_id.lower():
        problem = f"git blob id {checked.git_oid} does not match the hub's {remote.blob_id}"
    if problem:
        path.unlink(missing_ok=True)
        raise HubError(f"digest mismatch for {remote.name} of {repo_id}: {problem}; the file was deleted")
    return checked


class _ByteCount:
    """Bytes over a sequence of files: a file's own count while it runs, its listed size once it is done (so the
    last report equals the total even for a file that was already on disk and needed no bytes). A count equal to
    the last one reported is not reported again."""

    def __init__(self, report: Callable[[int], None]) -> None:
        self._report = report
        self._lock = threading.Lock()
        self._before = 0
        self._current = 0
        self._reported: int | None = None

    def add(self, n: int) -> None:
        with self._lock:
            self._current += n
        self._send()

    def file_done(self, size: int | None) -> None:
        with self._lock:
            self._before += size if size is not None else self._current
            self._current = 0
        self._send()

    def _send(self) -> None:
        with self._lock:
            done = self._before + self._current
            if done == self._reported:
                return
            self._reported = done
        self._report(done)


def _silent_bar(on_bytes: Callable[[int], None]) -> type:
    """A tqdm class for `hf_hub_download(tqdm_class=...)` that draws nothing and passes each byte count on."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class _SilentBar(hub_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if n:
                on_bytes(int(n))
            return None

        def update_transfer(self, n: int) -> None:
            """Network bytes of a Xet download: the written bytes (`update`) are the ones that count."""

        def set_transfer_postfix_str(self, *args, **kwargs) -> None:
            """Paired with `update_transfer`; nothing is drawn."""

    return _SilentBar


# -- the manifest ---------------------------------------------------------------------------------------------------


def _load_manifest(root: Path) -> _Manifest:
    try:
        data = json.loads((root / MANIFEST).read_text())
        checked = {name: _Checked(**entry) for name, entry in data.get("checked", {}).items()}
        return _Manifest(data.get("repo_id"), data.get("listing"), checked)
    except (OSError, ValueError, TypeError, AttributeError):
        return _Manifest()  # none yet, or unreadable: everything is checked again


def _save_manifest(root: Path, manifest: _Manifest) -> None:
    path = root / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    data = {"repo_id": manifest.repo_id, "listing": manifest.listing}
    data["checked"] = {name: asdict(entry) for name, entry in manifest.checked.items()}
    temp.write_text(json.dumps(data, indent=1))
    os.replace(temp, path)


# -- errors ---------------------------------------------------------------------------------------------------------


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection errors (huggingface_hub 2 uses httpx2; older releases httpx or requests)."""
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


@contextlib.contextmanager
def _translated(repo_id: str, settings: _Settings, name: str | None = None) -> Iterator[None]:
    """huggingface_hub's exceptions as HubError, with what the operator can do about them."""
    from huggingface_hub import errors

    what = f"{name} of {repo_id}" if name else repo_id
    try:
        yield
    except errors.OfflineModeIsEnabled as exc:
        raise HubError(f"cannot fetch {what}: HF_HUB_OFFLINE was set when Ember started") from exc
    except errors.GatedRepoError as exc:
        raise HubError(
            f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN ({_token_state(settings)})"
        ) from exc
    except errors.RepositoryNotFoundError as exc:
        if _status(exc) in (401, 403):
            raise HubError(_unauthorized(repo_id, settings)) from exc
        raise RepoNotFound(f"no repository {repo_id} on {settings.endpoint}") from exc
    except errors.RevisionNotFoundError as exc:
        raise HubError(f"{repo_id} changed while it was fetched; fetch it again") from exc
    except errors.RemoteEntryNotFoundError as exc:
        raise HubError(f"{repo_id} lists {name} but {settings.endpoint} does not serve it") from exc
    except errors.HfHubHTTPError as exc:
        if _status(exc) in (401, 403):
            raise HubError(_unauthorized(repo_id, settings)) from exc
        raise HubError(f"{settings.endpoint} answered {_status(exc)} for {what}") from exc
    except errors.LocalEntryNotFoundError as exc:
        reason = exc.__cause__ or exc
        raise HubError(f"cannot reach {settings.endpoint} for {what}: {reason}") from exc
    except _transport_errors() as exc:
        raise HubError(f"fetching {what} from {settings.endpoint} failed: {type(exc).__name__}: {exc}") from exc


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _token_state(settings: _Settings) -> str:
    return "HF_TOKEN is set, but the hub refused it" if settings.token else "HF_TOKEN is not set"


def _unauthorized(repo_id: str, settings: _Settings) -> str:
    return (
        f"{repo_id} on {settings.endpoint} needs authorization (a private or gated repository): set HF_TOKEN to a"
        f" token that can read it ({_token_state(settings)})"
    )
