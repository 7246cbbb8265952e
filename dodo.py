"""mergeforge's doit tasks: one task per stage, one subtask per recipe (and per quant type).

Task creators only read recipes and build metadata: no hashing of artifacts, no torch. Each action calls
steps.store.executor, which restores a stage from the content-keyed store or builds it.

    doit                          # build every recipe in recipes/ (MERGEFORGE_RECIPES to point elsewhere)
    doit quantize:demo-Q4_K_M     # one target and what it needs
    doit list --all / doit info merge:demo / doit forget / doit clean
    MERGEFORGE_UPDATE=1 doit      # resolve Hub sources' revisions again (else build/<recipe>/lock.json's commits)
    doit publish:demo             # upload to the Hub repos of the recipe's publish: block (never by default)
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from steps import constants as C
from steps import toolchain
from steps.console import Reporter
from steps.errors import MergeforgeError, user_message
from steps import settings
from steps.plan import Stage, plan
from steps.recipe import Recipe, discover
from steps.stage import declaration
from steps.store import execute
from steps import store

DEP_FILE = settings.build_root() / ".doit.json"
DOIT_CONFIG = {
    "backend": "json",
    "dep_file": str(DEP_FILE),
    "default_tasks": ["recipes", *C.STAGES],     # every stage, in the chain's order
    "verbosity": 2,
    "continue": True,             # a failing recipe (or quant) does not stop the others
    "reporter": Reporter,         # doit's report, short: each failure's reason once, last
}


def _recipes() -> tuple[list[Recipe], dict[Path, MergeforgeError]]:
    directory = settings.recipes_dir()
    try:
        DEP_FILE.parent.mkdir(parents=True, exist_ok=True)   # doit's state directory, before any task can fail
        return discover(directory)
    except MergeforgeError as exc:
        print(user_message(exc), file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:
        print(f"mergeforge: {exc.filename}: {exc.strerror}; check the path and its permissions "
              "(MERGEFORGE_BUILD, MERGEFORGE_RECIPES)", file=sys.stderr)
        raise SystemExit(2) from None


logging.basicConfig(level=logging.INFO, format="%(message)s")
RECIPES, BROKEN = _recipes()
STAGES: list[Stage] = [stage for recipe in RECIPES for stage in plan(recipe)]

# Commands that only read: every other one (run, clean, forget, ...) holds build/.lock for the whole run.
READ_ONLY_COMMANDS = ("list", "info", "help", "dumpdb", "tabcompletion")
DOIT_COMMANDS = ("run", "clean", "dumpdb", "forget", "help", "ignore", "info", "list", "reset-dep", "strace",
                 "tabcompletion", "auto")


def _command(argv: list[str]) -> str:
    """The doit command of this process's command line (doit's own rule: the first word if it names a command)."""
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-f", "--file", "-d", "--dir"):
            next(args, None)
        elif not arg.startswith("-") and "=" not in arg:
            return arg if arg in DOIT_COMMANDS else "run"
    return "run"


def _hold_build_dir() -> None:
    """One doit per build directory: a second one exits at once with one line. Then a state file that a full
    disk left truncated is moved aside (doit would refuse to start on it)."""
    if _command(sys.argv) in READ_ONLY_COMMANDS:
        return
    try:
        store.lock_build_dir(DEP_FILE.parent)
    except MergeforgeError as exc:
        print(user_message(exc), file=sys.stderr)
        raise SystemExit(1) from None
    store.protect_doit_state()
    notice = store.recover_state_file(DEP_FILE)
    if notice:
        print(notice, file=sys.stderr)


_hold_build_dir()


def _run(stage: Stage) -> TaskFailed | None:
    try:
        execute(stage)
    except MergeforgeError as exc:
        return TaskFailed(user_message(exc))
    except OSError as exc:                      # a full disk, a permission: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        return TaskFailed(f"mergeforge: {stage.id}: {where}{exc.strerror or exc}; fix the cause and run doit "
                          "again (finished stages restore from the store)")
    return None


def _task(stage: Stage) -> dict[str, object]:
    uptodate: list[object] = [config_changed({"params": stage.params, "tools": stage.tools()})]
    is_current = declaration(stage.kind).is_current
    if is_current is not None:
        uptodate.append((is_current, [stage]))
    uptodate.append((store.placed_is_current, [stage]))   # stat only: outputs in build/, the entry in the store
    return {
        "name": stage.name,
        "actions": [(_run, [stage])],
        "file_dep": [str(s.target) for s in STAGES if s.id in stage.deps] + [str(p) for p in stage.files.values()],
        "task_dep": ["toolchain"] if C.STAGES[stage.kind].llama_cpp else [],
        # a GGUF split into parts has no file of its nominal name: its manifest (the first target) stands for it
        "targets": [str(stage.target), *(str(stage.build_dir / out) for out in stage.outputs
                                         if "split_max_size" not in stage.params)],
        "uptodate": uptodate,
        "clean": True,
        "doc": f"{stage.id}",
    }


def _asked_of_broken(kind: str) -> dict[str, MergeforgeError]:
    """The subtasks of this kind the command line names for a recipe that does not load (``merge:<recipe>``,
    ``quantize:<recipe>-Q4_K_M``): each becomes a task that fails with the recipe's error, not doit's "invalid
    parameter"."""
    by_name = {path.stem: error for path, error in BROKEN.items()}
    asked: dict[str, MergeforgeError] = {}
    for arg in sys.argv[1:]:
        basename, _, name = arg.partition(":")
        if basename != kind or not name:
            continue
        for stem, error in by_name.items():
            if name == stem or name.startswith(stem + "-"):
                asked[name] = error
    return asked


def _stage_tasks(kind: str):  # type: ignore[no-untyped-def]
    # a recipe that does not load fails `doit <stage>` too (once, as recipes:<file>), without stopping the others
    yield {"basename": kind, "name": None, "doc": C.STAGES[kind].doc, "task_dep": ["recipes"]}
    names = set()
    for stage in STAGES:
        if stage.kind == kind:
            names.add(stage.name)
            yield _task(stage)
    for name, error in _asked_of_broken(kind).items():
        if name not in names:
            yield {"name": name, "actions": [(_refuse, [error])], "uptodate": [False], "verbosity": 0}


def _refuse(error: MergeforgeError) -> TaskFailed:
    return TaskFailed(user_message(error))


def task_recipes():  # type: ignore[no-untyped-def]
    """recipes that do not load: each fails here with one line; the other recipes still build"""
    yield {"basename": "recipes", "name": None, "doc": "recipe files that do not load (one failing task each)"}
    for path, error in BROKEN.items():
        yield {"name": path.name, "actions": [(_refuse, [error])], "uptodate": [False], "verbosity": 0}


def task_toolchain():  # type: ignore[no-untyped-def]
    """build llama.cpp's programs once (pinned version, cached outside the repository)"""
    return {"actions": [toolchain.ensure], "uptodate": [toolchain.is_available], "verbosity": 2}


def _stage_task_creator(kind: str):  # type: ignore[no-untyped-def]
    def creator():  # type: ignore[no-untyped-def]
        yield from _stage_tasks(kind)
    creator.__doc__ = C.STAGES[kind].doc
    return creator


# task_fetch, task_merge, ...: one task per kind of stage in constants.STAGES, one subtask per stage of the plan
for _kind in C.STAGES:
    globals()[f"task_{_kind}"] = _stage_task_creator(_kind)


def _verify(full: bool, remote: bool) -> TaskFailed | None:
    full = full or settings.verify_full()
    try:
        problems, summary = store.verify(RECIPES, full=full, remote=remote)
    except MergeforgeError as exc:
        return TaskFailed(user_message(exc))
    print(summary)
    return TaskFailed("\n".join(problems)) if problems else None


def _push() -> TaskFailed | None:
    try:
        for line in store.push_all():
            print(line)
    except MergeforgeError as exc:
        return TaskFailed(user_message(exc))
    return None


def task_push():  # type: ignore[no-untyped-def]
    """upload every local store entry the remote store (MERGEFORGE_REMOTE) lacks (not default)"""
    return {"actions": [_push], "uptodate": [False], "verbosity": 2}


def _pull() -> TaskFailed | None:
    try:
        lines, complete = store.pull(RECIPES)
    except MergeforgeError as exc:
        return TaskFailed(user_message(exc))
    for line in lines:
        print(line)
    return None if complete else TaskFailed("mergeforge: pull: " + lines[-1].removeprefix("pull: "))


def task_pull():  # type: ignore[no-untyped-def]
    """restore every stage the recipes need from the store or the remote store, building none (not default)"""
    return {"actions": [_pull], "uptodate": [False], "verbosity": 2}


def task_verify():  # type: ignore[no-untyped-def]
    """re-hash every store entry and placed artifact against its manifest; quarantine what is corrupt (not default)"""
    return {"actions": [_verify], "uptodate": [False], "verbosity": 2,
            "params": [{"name": "full", "long": "full", "type": bool, "default": False,
                        "help": "read every byte (silent bit rot), not only files changed since they were hashed "
                                "(also MERGEFORGE_VERIFY_FULL=1)"},
                       {"name": "remote", "long": "remote", "type": bool, "default": False,
                        "help": "also check the remote store (MERGEFORGE_REMOTE): every file's size, with --full "
                                "its digest; deletes nothing there"}]}


def _gc(keep: int) -> None:
    for line in store.gc(RECIPES, keep):
        print(line)


def task_gc():  # type: ignore[no-untyped-def]
    """remove store entries the current builds do not use, keeping the last N of each stage (not default)"""
    return {"actions": [_gc], "uptodate": [False], "verbosity": 2,
            "params": [{"name": "keep", "long": "keep", "type": int,
                        "default": settings.gc_keep(),
                        "help": "recent store entries kept per stage besides the current ones (MERGEFORGE_GC_KEEP)"}]}


def _publish(recipe: Recipe, dry_run: bool, force: bool) -> TaskFailed | None:
    from steps.publish import publish
    try:
        for line in publish(recipe, dry_run=dry_run, force=force):
            print(line)
    except MergeforgeError as exc:
        return TaskFailed(user_message(exc))
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return TaskFailed(f"mergeforge: publish:{recipe.name}: {where}{exc.strerror or exc}; fix the cause and run it "
                          "again (files already on the Hub are skipped)")
    return None


def task_publish():  # type: ignore[no-untyped-def]
    """upload each recipe's publish: artifacts to the Hub (never by default; builds what it uploads first)"""
    from steps.publish import needs
    yield {"basename": "publish", "name": None, "task_dep": ["recipes"],
           "doc": "upload the model and GGUFs each recipe's publish: block names to the Hub (not default)"}
    for recipe in RECIPES:
        if recipe.publish is not None:
            yield {"name": recipe.name, "actions": [(_publish, [recipe])], "task_dep": needs(recipe),
                   "uptodate": [False], "verbosity": 2, "doc": f"publish:{recipe.name}",
                   "params": [{"name": "dry_run", "long": "dry-run", "type": bool, "default": False,
                               "help": "print what would be uploaded and skipped; upload nothing"},
                              {"name": "force", "long": "force", "type": bool, "default": False,
                               "help": "publish GGUFs that fail the recipe's gates: (the model card says which)"}]}
