"""The Hugging Face Hub as a source: pin a repository's revision to a commit, download the chosen files into the
Hugging Face cache (huggingface_hub does every transfer), check them against the lock, and give the stages a
directory that holds exactly the pinned files.

- A file's digest is the sha256 the Hub publishes for LFS files (the cache names each blob after it), never
  re-hashed on first sight; small git-stored files are hashed here. Later runs check each blob through a stat cache
  (device, inode, size, mtime), so a file changed in the cache behind the project's back is hashed again and refused.
- With a locked commit and every file in the cache, nothing touches the network (HF_HUB_OFFLINE=1 works).
- The token is huggingface_hub's own (HF_TOKEN or `hf auth login`): this module never reads, logs or writes it.
- Works for any repo type: model sources use ``select_model``; a dataset caller passes its own ``select``.

    python -m steps.hub org/name [revision]      # resolve a model repository and list what fetch would pin
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from steps import settings
from steps.errors import MergeforgeError
from steps.hashing import StatCache, digest_value

logger = logging.getLogger(__name__)

REPO_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UPDATE_ENV = "MERGEFORGE_UPDATE"
UPDATE_ALL = ("1", "all", "*", "yes", "true")

CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.tiktoken")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")   # pickles that hold no weights


class HubError(MergeforgeError):
    """A Hub source cannot be pinned. ``key`` is the source's key at fault (``hf``, ``revision``, ``allow_pickle``);
    the caller names its file and source."""

    def __init__(self, key: str, message: str) -> None:
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


@dataclass(frozen=True)
class HubFile:
    size: int
    sha256: str | None          # the LFS sha256 the Hub publishes; None for a small git-stored file


@dataclass(frozen=True)
class Pinned:
    """A repository pinned to a commit, every chosen file in the cache and checked."""
    repo: str
    repo_type: str
    ref: str                                   # what the recipe asked for: branch, tag or commit
    commit: str
    files: dict[str, dict[str, Any]]           # path in the repository -> {size, sha256}
    snapshot: Path                             # the cache's snapshots/<commit>/

    def record(self) -> dict[str, Any]:
        """What the fetch stage records and lock.json keeps: no path, no token."""
        return {"kind": "hf", "repo": self.repo, **({"repo_type": self.repo_type} if self.repo_type != "model"
                                                      else {}),
                "ref": self.ref, "revision": self.commit, "files": self.files}


class Sha256Cache(StatCache):
    """The stat cache's (device, inode, size, mtime) map, for sha256: a file is hashed at most once per change."""

    def digest(self, path: Path) -> str:
        found = self._load().get(self._stat_key(path))
        if found is None:
            found = sha256_file(path)
            self.remember(path, found)
        return found

    def blob(self, path: Path) -> str:
        """A cache blob's sha256. The first time this path is seen, a blob named after a sha256 is taken at its name
        (the Hub's LFS digest, which huggingface_hub names it by: no re-hash of a 18 GB download); once its stat
        changes (a write, a replacement) it is hashed again."""
        stat_key = self._stat_key(path)
        entries = self._load()
        if stat_key in entries:
            return entries[stat_key]
        seen = f"path:{path}"
        value = path.name if seen not in entries and SHA256_RE.fullmatch(path.name) else sha256_file(path)
        self.remember(path, value)
        entries[seen] = stat_key
        return value


def sha256_file(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """The Hugging Face cache huggingface_hub uses (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.is_offline_mode())


def storage(repo: str, repo_type: str, cache: Path) -> Path:
    """The repository's folder in the cache, as huggingface_hub names it: models--org--name, datasets--org--name."""
    return cache / f"{repo_type}s--{repo.replace('/', '--')}"


def update_requested(recipe: str, source: str) -> bool:
    """MERGEFORGE_UPDATE asks to resolve this source's revision again: ``1``/``all`` (every source), a recipe name
    (its sources) or ``<recipe>:<source>``, comma-separated."""
    wanted = {w.strip() for w in settings.update().split(",") if w.strip()}
    return bool(wanted & {*UPDATE_ALL, recipe, f"{recipe}:{source}"})


def safe_name(name: str) -> bool:
    """A relative path inside a repository: no absolute path, no '..', no empty or hidden part."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith("/") and "\\" not in name and all(
        p not in ("", ".", "..") and not p.startswith(".") for p in parts)


def _url(repo: str, repo_type: str) -> str:
    from huggingface_hub import constants
    return f"{constants.ENDPOINT}/{'' if repo_type == 'model' else repo_type + 's/'}{repo}"


def _not_cached(repo: str, at: str, cache: Path, why: str, what: str = "") -> HubError:
    have = f"{what} of {repo}" if what else repo
    return HubError("hf", f"{have} at {at} is not in the Hugging Face cache ({cache}) and {why}; connect this "
                    "machine to the Hub (without HF_HUB_OFFLINE=1) to download it once, or download the model "
                    "elsewhere and give its directory as path:")


def _why_not() -> str:
    return "HF_HUB_OFFLINE=1 forbids downloading it" if offline() else "the Hub cannot be reached"


def _explain(exc: Exception, repo: str, at: str, repo_type: str, cache: Path, what: str = "") -> HubError:
    """huggingface_hub's exception (one of _hub_errors) as one line saying what to do."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    if isinstance(exc, GatedRepoError):
        return HubError("hf", f"{repo} is gated: accept its conditions at {_url(repo, repo_type)} with your Hugging "
                        "Face account, then log in on this machine (`hf auth login`, or set HF_TOKEN)")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError("hf", f"{repo} was not found on the Hub, or it is private and this machine is not logged in "
                        "with an account that can read it; check the name, or log in (`hf auth login`, or set "
                        "HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return HubError("revision", f"{at} not found in {repo}; give a branch, tag or commit of the repository "
                        f"({_url(repo, repo_type)})")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        return HubError("hf", f"the Hub answered HTTP {status} for {repo} at {at}; try again later, or check "
                        f"{_url(repo, repo_type)}")
    cause = type(exc.__cause__ or exc).__name__
    return _not_cached(repo, at, cache, _why_not() + ("" if offline() else f" ({cause})"), what)


def _network(exc: Exception) -> bool:
    import httpx2
    return isinstance(exc, httpx2.TransportError)


def _hub_errors() -> tuple[type[Exception], ...]:
    import httpx2
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RevisionResolutionError)
    return HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RevisionResolutionError, httpx2.TransportError


@cache
def _resolve(repo: str, revision: str, repo_type: str,
             cache: Path) -> tuple[str, tuple[tuple[str, HubFile], ...] | None]:
    """The commit a revision names, and the repository's listing at it (None when the Hub cannot be reached: the
    cache's refs/ resolved it). Once per process: the key and the build see the same commit."""
    from huggingface_hub import HfApi, RepoFile
    api = HfApi()
    at = f"revision {revision!r}"
    try:
        commit = api.resolve_revision(repo, repo_type=repo_type, revision=revision, cache_dir=cache,
                                      local_files_only=offline()).resolved
    except _hub_errors() as exc:
        raise _explain(exc, repo, at, repo_type, cache) from None
    if not COMMIT_RE.fullmatch(commit):
        raise HubError("revision", f"{repo} at {at} resolved to {commit!r}, not a commit; check the cache's refs/ "
                       f"in {storage(repo, repo_type, cache)}")
    if offline():
        return commit, None
    try:
        tree = api.list_repo_tree(repo, revision=commit, repo_type=repo_type, recursive=True)
        listing = tuple((f.path, HubFile(int(f.size), f.lfs.sha256 if f.lfs is not None else None))
                        for f in tree if isinstance(f, RepoFile))
    except _hub_errors() as exc:
        if _network(exc):
            return commit, None
        raise _explain(exc, repo, at, repo_type, cache) from None
    return commit, listing


def cached_listing(snapshot: Path) -> dict[str, HubFile]:
    """What the cache holds of a commit: each file's size, and its sha256 when its blob is named after it."""
    found: dict[str, HubFile] = {}
    if not snapshot.is_dir():
        return found
    for folder, _, files in os.walk(snapshot):
        for name in files:
            path = Path(folder) / name
            if not path.is_file():
                continue
            target = path.resolve()
            rel = path.relative_to(snapshot).as_posix()
            found[rel] = HubFile(target.stat().st_size, target.name if SHA256_RE.fullmatch(target.name) else None)
    return found


def download(repo: str, commit: str, names: list[str], *, repo_type: str, cache: Path, at: str) -> None:
    """The named files of a commit into the cache (snapshot_download with allow_patterns), or one line saying why
    not (``at`` says which revision, for the message)."""
    if offline():
        raise _not_cached(repo, at, cache, _why_not(), names[0])
    from huggingface_hub import snapshot_download
    logger.info("downloading %d file(s) of %s at %s from the Hub", len(names), repo, commit[:12])
    try:
        snapshot_download(repo, repo_type=repo_type, revision=commit, cache_dir=cache,
                          allow_patterns=[glob.escape(n) for n in names])
    except _hub_errors() as exc:
        raise _explain(exc, repo, at, repo_type, cache, names[0]) from None
    snapshot = storage(repo, repo_type, cache) / "snapshots" / commit
    missing = [n for n in names if not (snapshot / n).is_file()]
    if missing:
        raise HubError("hf", f"{repo}@{commit[:12]} holds no file {missing[0]}; was its history rewritten? resolve "
                       f"the revision again ({UPDATE_ENV}=1)")


def pin(repo: str, revision: str, *, select: Callable[[dict[str, HubFile], Callable[[str], Path]], list[str]],
        digests: Sha256Cache, repo_type: str = "model", locked: dict[str, Any] | None = None, update: bool = False,
        cache: Path | None = None, lock_name: str = "the lock") -> Pinned:
    """Pin a repository: the commit of ``locked`` (a lock entry, as Pinned.record writes it) unless ``update``, else
    the commit the revision names now, with the files ``select`` picks from its listing (its second argument fetches
    one file, e.g. an index). Missing files are downloaded; every file is checked against the lock, or against the
    Hub's sha256."""
    cache = cache or cache_dir()
    folder = storage(repo, repo_type, cache)
    if locked is not None and not update:
        try:
            commit = str(locked["revision"])
            wanted = {str(n): HubFile(int(i["size"]), str(i["sha256"])) for n, i in locked["files"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise HubError("hf", f"{lock_name} holds a malformed entry for {repo}; delete the entry (or the file) to "
                           "resolve the revision again") from None
        at, source = f"commit {commit[:12]} (locked in {lock_name})", lock_name
    else:
        commit, remote = _resolve(repo, revision, repo_type, cache)
        at, source = f"revision {revision!r}", "the Hub"
        listing = dict(remote) if remote is not None else cached_listing(folder / "snapshots" / commit)

        def fetch_one(name: str) -> Path:
            if not (folder / "snapshots" / commit / name).is_file():
                download(repo, commit, [name], repo_type=repo_type, cache=cache, at=at)
            return folder / "snapshots" / commit / name

        names = select(listing, fetch_one)
        unknown = [n for n in names if n not in listing]
        if unknown and remote is not None:
            raise HubError("hf", f"{repo}@{commit[:12]}: its index names {unknown[0]}, which the repository does not "
                           "hold; pick another revision")
        if unknown:
            raise _not_cached(repo, at, cache, _why_not(), unknown[0])
        wanted = {n: listing[n] for n in names}
    bad = [n for n in wanted if not safe_name(n)]
    if bad or not COMMIT_RE.fullmatch(commit):
        raise HubError("hf", f"{source} names {bad[0] if bad else commit!r}, not a file of a commit; delete the "
                       "lock's entry for this source to resolve the revision again")
    snapshot = folder / "snapshots" / commit
    missing = [n for n in wanted if not (snapshot / n).is_file()]
    if missing:
        download(repo, commit, missing, repo_type=repo_type, cache=cache, at=at)
    files = _check(repo, commit, snapshot, folder / "blobs", wanted, digests, source)
    return Pinned(repo, repo_type, revision, commit, files, snapshot)


def _check(repo: str, commit: str, snapshot: Path, blobs: Path, wanted: dict[str, HubFile], digests: Sha256Cache,
           source: str) -> dict[str, dict[str, Any]]:
    """Each file a link to a file in the repository's blobs/, of the expected size and sha256 (Sha256Cache.blob)."""
    blobs = blobs.resolve()
    files: dict[str, dict[str, Any]] = {}
    for name, want in sorted(wanted.items()):
        link = snapshot / name
        target = link.resolve()
        where = f"{name} of {repo}@{commit[:12]} in the Hugging Face cache"
        if target.parent != blobs or not target.is_file():
            raise HubError("hf", f"{where} ({link}) is not a link to a file in {blobs}; delete {snapshot} so that "
                           "fetch downloads it again")
        size = target.stat().st_size
        if size != want.size:
            raise HubError("hf", f"{where} ({target}) holds {size} bytes, {source} says {want.size}: it changed "
                           "behind the project's back; delete it (and its link in snapshots/) so that fetch "
                           "downloads it again")
        got = digests.blob(target)
        if want.sha256 is not None and got != want.sha256:
            raise HubError("hf", f"{where} ({target}) has sha256 {got}, {source} says {want.sha256}: it changed "
                           "behind the project's back; delete it (and its link in snapshots/) so that fetch "
                           "downloads it again")
        files[name] = {"size": size, "sha256": got}
    digests.save()
    return files


def select_model(listing: dict[str, HubFile], fetch_one: Callable[[str], Path],
                 allow_pickle: bool = False) -> list[str]:
    """The files of a transformers model: config, generation config, tokenizer, chat template, and its safetensors
    weights (model.safetensors, or the index and the shards it names). Pickled weights (.bin/.pt/.pth) only with
    ``allow_pickle`` and when the repository has no safetensors; then the pickle index's shards, or every top-level
    pickle that is not a trainer's state."""
    top = sorted(n for n in listing if "/" not in n)
    if "config.json" not in top:
        raise HubError("hf", f"no config.json at the top of the repository (it holds {_some(top)}); give a "
                       "transformers model repository")
    small = [n for n in top if n in (*CONFIG_FILES, *TOKENIZER_FILES, *CHAT_TEMPLATE_FILES)]
    if SAFETENSORS_INDEX in top:
        weights = [SAFETENSORS_INDEX, *_index_shards(fetch_one(SAFETENSORS_INDEX), ".safetensors")]
    elif SAFETENSORS_SINGLE in top:
        weights = [SAFETENSORS_SINGLE]
    else:
        if PICKLE_INDEX in top:
            pickled = [PICKLE_INDEX, *_index_shards(fetch_one(PICKLE_INDEX), ".bin")]
        else:
            pickled = [n for n in top if n.endswith(PICKLE_SUFFIXES) and n not in TRAINER_FILES
                       and not n.startswith("rng_state")]
        if not pickled:
            raise HubError("hf", f"no model weights: neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX} (the "
                           f"repository holds {_some(top)}); pick the repository or revision with the safetensors "
                           "model")
        if not allow_pickle:
            raise HubError("hf", f"no safetensors weights, only pickled ones ({_some(pickled)}), which can run code "
                           "when loaded; set allow_pickle: true on the source to load them with torch's weights_only "
                           "loader and convert them to safetensors, or pick a revision with safetensors")
        return sorted({*small, *pickled})
    if allow_pickle:
        raise HubError("allow_pickle", f"the repository has safetensors weights ({weights[0]}), used as they are; "
                       "remove allow_pickle: true")
    return sorted({*small, *weights})


def pickled_weights(names: list[str]) -> list[str]:
    """The pickled weight files among a selection (their index excluded)."""
    return [n for n in names if n.endswith(PICKLE_SUFFIXES)]


def _index_shards(index: Path, suffix: str) -> list[str]:
    try:
        data = json.loads(index.read_bytes())
        shards = sorted(set(data["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise HubError("hf", f"{index.name} is not an index (a JSON object with a weight_map); pick another "
                       "revision") from None
    bad = [s for s in shards if not isinstance(s, str) or "/" in s or not safe_name(s) or not s.endswith(suffix)]
    if bad or not shards:
        raise HubError("hf", f"{index.name} names {bad[0] if bad else 'no shard'!r}, not a {suffix} file beside it; "
                       "pick another revision")
    return shards


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "") if names else "nothing"


def view(pinned: Pinned, root: Path) -> Path:
    """A directory holding exactly the pinned files, laid out as a cache snapshot: ``<root>/<repo folder>-<id>/
    {blobs -> the cache's blobs/, snapshots/<commit>-<files digest>/<file> -> ../../blobs/<blob>}``. The snapshot in
    the cache may hold more (another download of the same commit); the stages read this one."""
    folder = pinned.snapshot.parent.parent
    repo_view = root / f"{folder.name}-{digest_value(str(folder))[:12]}"
    dest = repo_view / "snapshots" / f"{pinned.commit}-{digest_value(pinned.files)[:16]}"
    if dest.is_dir():
        return dest
    (repo_view / "snapshots").mkdir(parents=True, exist_ok=True)
    blobs = repo_view / "blobs"
    if not blobs.is_symlink():
        tmp_link = repo_view / f".blobs.{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(folder / "blobs")
        os.replace(tmp_link, blobs)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=repo_view / "snapshots"))
    try:
        for name in pinned.files:
            link = tmp / name
            link.parent.mkdir(parents=True, exist_ok=True)
            target = blobs / (pinned.snapshot / name).resolve().name
            link.symlink_to(os.path.relpath(target, (dest / name).parent))
        os.rename(tmp, dest)
    except OSError:
        if not dest.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from steps.settings import store_root
    found = pin(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "main", select=select_model,
                digests=Sha256Cache(store_root() / "sha256cache.json"))
    print(json.dumps(found.record(), indent=1))
