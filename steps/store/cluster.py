"""Stages as cluster jobs (``MERGEFORGE_CLUSTER``): a heavy stage (the heal by default; any stage named in
``MERGEFORGE_CLUSTER_STAGES``) runs as a job on a scheduler through submitit — ``slurm``, or ``local`` (a process on
this machine, what the tests use) — with the remote store (``MERGEFORGE_REMOTE``) as the hand-over.

Here: the stage's inputs are pushed to the remote, the job is submitted, its state and the new lines of its log
reach the terminal while doit waits, and once it succeeds the key is pulled from the remote like any other. In
the job (a fresh process, wherever the scheduler puts it): a workspace of its own under the job's folder, its
upstream stages pulled from the remote (never built there), the stage built, and the key pushed. A job that fails
says why in one line, with its log's path. ``MERGEFORGE_CLUSTER_OPTIONS`` holds submitit's parameters as JSON
(``{"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 900}``); ``MERGEFORGE_CLUSTER_DIR`` the job
folders (default ``<store>/jobs``; on Slurm it must be a path the nodes share, as must the recipe).
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import settings
from steps.errors import MergeforgeError, StepFailed

if TYPE_CHECKING:
    from steps.stage import Stage

logger = logging.getLogger(__name__)

POLL_S = 2.0


def wanted(stage: Stage) -> bool:
    """Whether this stage runs as a cluster job here."""
    return bool(settings.cluster()) and stage.kind in settings.cluster_stages()


def run(stage: Stage, key: str, job_main: Callable[..., str]) -> str:
    """Build ``key`` as a job running ``job_main`` (steps.store.executor's) and bring it into the local store (the
    caller holds the key's lock). Returns the job's id."""
    from steps.plan import plan
    from steps.store.keys import entry
    from steps.store.remote import configured
    if settings.cluster() not in ("slurm", "local"):
        raise MergeforgeError(f"{stage.id}: MERGEFORGE_CLUSTER={settings.cluster()}: expected slurm or local "
                              "(submitit's executors), or unset it to build here")
    remote = configured()
    if remote is None:
        raise MergeforgeError(f"{stage.id}: MERGEFORGE_CLUSTER={settings.cluster()} runs it as a job, which hands "
                              "its result back through a remote store; set MERGEFORGE_REMOTE (a URL the job can "
                              "reach too: file:// on a shared disk, s3://, ...)")
    stages = {st.id: st for st in plan(stage.recipe.sweep or stage.recipe)}
    todo, seen = list(stage.deps), set()
    while todo:                                       # the job pulls every stage it builds on
        dep = todo.pop()
        if dep in seen:
            continue
        seen.add(dep)
        todo += stages[dep].deps
        placed = json.loads((stage.target.with_name(f"{dep.replace(':', '.', 1)}.key")).read_text())["key"]
        if (entry(placed) / "manifest.json").exists():
            remote.push(placed, dep)
    import submitit
    folder = settings.cluster_dir() / f"{stage.kind}.{key[:16]}"
    executor = submitit.AutoExecutor(folder=folder, cluster=settings.cluster())
    executor.update_parameters(**{"timeout_min": 24 * 60, **settings.cluster_options()})   # submitit's is 5 min
    # the job inherits this environment (submitit's local executor; Slurm's default --export=ALL): nothing of it,
    # credentials least of all, is written into the job's pickle on disk
    job = executor.submit(job_main, str(stage.recipe.file), stage.id, key, str(folder / "workspace"))
    logger.info("%s: submitted as %s job %s (log: %s)", stage.id, settings.cluster(), job.job_id, job.paths.stderr)
    shown = {"out": 0, "err": 0}
    state = ""
    while not job.done():
        time.sleep(POLL_S)
        if job.state != state:
            state = job.state
            logger.info("%s: job %s is %s", stage.id, job.job_id, state)
        _tail(stage, job, shown)
    _tail(stage, job, shown)
    try:
        job.result()
    except Exception as exc:                          # submitit re-raises the job's error, with its traceback
        raise StepFailed(f"{stage.id}: {settings.cluster()} job {job.job_id} failed: {_why(str(exc), job)}; its log "
                         f"is {job.paths.stderr}") from None
    got = remote.pull(key, stage.id)
    if got != []:
        raise StepFailed(f"{stage.id}: {settings.cluster()} job {job.job_id} finished, but the remote store has no "
                         f"good entry for key {key[:12]}; its log is {job.paths.stdout}")
    return str(job.job_id)


def _tail(stage: Stage, job: Any, shown: dict[str, int]) -> None:
    """Print the lines of the job's logs (stdout, stderr) not shown yet."""
    for which, path in (("out", job.paths.stdout), ("err", job.paths.stderr)):
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines[shown[which]:]:
            logger.info("%s [job %s] %s", stage.id, job.job_id, line)
        shown[which] = len(lines)


ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Failed|Interrupt)\w*): (.+)$")


def _why(message: str, job: Any) -> str:
    """The reason a job failed, in one line: the last exception line of its traceback, else the scheduler's last
    word (a timeout, a cancellation)."""
    try:
        log = Path(job.paths.stderr).read_text(errors="replace")
    except OSError:
        log = ""
    lines = [line.strip() for line in (message + "\n" + log).splitlines() if line.strip()]
    found = [f"{m.group(1)}: {m.group(2)}" for line in lines if (m := ERROR_LINE.match(line))]
    if found:
        return found[-1].replace("mergeforge: ", "")
    said = [line for line in lines if " - " in line and ("ERROR" in line or "timed out" in line or "INFO" in line)]
    return said[-1].split(" - ", 1)[1] if said else (lines[-1] if lines else "no message")
