"""What a stage is, and what it declares to the executor.

A ``Stage`` is one planned step (``merge:demo``, ``quantize:demo-Q4_K_M``): its kind, the normalized recipe subtree
it reads, its upstream stages and input files, and its artifact paths. Each kind of stage is a module in ``steps/``
that declares itself with one ``STAGE = Declaration(...)``: its build function and, where it needs them, its extra
key inputs, tools, space estimate, pre-build check and uptodate check. The executor (``steps.store``) calls only
these, through ``declaration(kind)``, and knows no stage by name; ``constants.STAGES`` is the one table that names
each kind's module.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import constants as C
from steps.settings import build_root

if TYPE_CHECKING:
    from steps.hashing import StatCache
    from steps.recipe import Recipe

Inputs = dict[str, dict[str, Any]]          # upstream stage id -> its target manifest


@cache
def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


@lru_cache(maxsize=1)
def llama_cpp_version() -> str:
    from steps import toolchain
    return toolchain.locate().version


@dataclass(frozen=True)
class Stage:
    kind: str                                   # fetch, merge, convert, imatrix, quantize, bench
    name: str                                   # subtask name: "<recipe>" or "<recipe>-<TYPE>"
    recipe: Recipe
    params: dict[str, Any]                      # the normalized recipe subtree this stage reads
    deps: tuple[str, ...] = ()                  # upstream stage ids
    files: dict[str, Path] = field(default_factory=dict)   # small input files hashed into the key
    outputs: tuple[str, ...] = ()               # artifact paths (relative to build_dir) known before running
    cell: str = ""                              # in a sweep (matrix:): the settings this stage is built for

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def build_dir(self) -> Path:
        return build_root() / self.recipe.name

    @property
    def target(self) -> Path:
        return self.build_dir / C.MANIFEST_DIR / f"{self.kind}.{self.name}.json"

    @property
    def key_file(self) -> Path:
        return self.build_dir / C.MANIFEST_DIR / f"{self.kind}.{self.name}.key"

    def tools(self) -> dict[str, str]:
        """The versions that enter the key: the stage's packages, its code version, llama.cpp's for the stages
        that run it, and whatever else its declaration says changes its bytes."""
        spec = C.STAGES[self.kind]
        tools = {pkg: package_version(pkg) for pkg in spec.packages}
        tools["mergeforge-stage"] = str(spec.version)
        if spec.llama_cpp:
            tools["llama.cpp"] = llama_cpp_version()
        if spec.native:                          # another machine's arithmetic: other bytes under another key
            from steps import settings, toolchain
            tools["llama.cpp-target"] = toolchain.build_target()
            if settings.gpu_layers():
                tools["gpu_layers"] = str(settings.gpu_layers())
        extra = declaration(self.kind).tools
        if extra is not None:
            tools.update(extra(self))
        return tools


@dataclass
class Context:
    """What a stage's build function gets: where to write, and what its inputs are."""
    stage: Stage
    key: str
    out: Path                                     # temporary directory: write every output here
    inputs: Inputs                                # upstream stage id -> its target manifest
    cache: StatCache
    record: dict[str, Any] = field(default_factory=dict)   # extra facts for the target (e.g. source revisions)

    def upstream(self, kind: str) -> dict[str, Any]:
        """The target manifest of the stage's one upstream stage of this kind (its own variant's convert, ...)."""
        (dep,) = [d for d in self.stage.deps if d.split(":", 1)[0] == kind]
        return self.inputs[dep]

    def upstream_file(self, kind: str) -> str:
        """The main artifact of an upstream stage: the one it names as ``main`` (convert: the GGUF beside its
        projector), or its only one (imatrix)."""
        manifest = self.upstream(kind)
        if "main" in manifest:
            return str(manifest["main"])
        (name,) = manifest["outputs"]
        return str(name)


@dataclass(frozen=True)
class Declaration:
    """What one kind of stage tells the executor. Only ``build`` is required.

    - build(ctx): write every output under ctx.out (a temporary directory; the executor publishes it).
    - key_inputs(stage, cache) -> dict: facts beyond params, files and upstream outputs that enter the key (a
      local source's file digests, the heal's tokenized blend).
    - tools(stage) -> dict: machine facts that change the bytes (a device, a launcher, the suite's code digest).
    - estimate_bytes(stage, inputs) -> int: about how much it writes; the executor refuses up front when the disk
      has less. Errors reading what it needs fall back to a small estimate.
    - check(stage, inputs): a check the recipe schema cannot make early (it needs a fetched model); raises a
      MergeforgeError in one line before any space is asked for or anything is written.
    - is_current(stage) -> bool: an extra doit uptodate check, cheap (stat-cached), e.g. local sources unchanged.
    - keyed_outputs(outputs) -> outputs: what of this stage's outputs a downstream key reads (default: all).
    """
    build: Callable[[Context], None]
    key_inputs: Callable[[Stage, StatCache], dict[str, Any]] | None = None
    tools: Callable[[Stage], dict[str, str]] | None = None
    estimate_bytes: Callable[[Stage, Inputs], int] | None = None
    check: Callable[[Stage, Inputs], None] | None = None
    is_current: Callable[[Stage], bool] | None = None
    keyed_outputs: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def declaration(kind: str) -> Declaration:
    """The declaration of a kind of stage, from the module ``constants.STAGES`` names for it."""
    found = getattr(importlib.import_module(C.STAGES[kind].module), "STAGE", None)
    if not isinstance(found, Declaration):
        raise TypeError(f"{C.STAGES[kind].module} declares no STAGE = Declaration(...)")
    return found
