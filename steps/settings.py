"""The machine's settings: every environment variable mergeforge reads, its default and its meaning, in one place.

These belong to the machine, not the recipe: where the build, the store and llama.cpp are, how many threads, which
device. None of them enters a stage key, except where a setting changes an artifact's bytes, and then the stage
that reads it records it among its tools (MERGEFORGE_MERGE_DEVICE, MERGEFORGE_HEAL_LAUNCH). This is the only module
that reads ``os.environ`` for a MERGEFORGE_* variable (tests/test_layers.py checks it); each is read when asked
for, so a changed environment (a test's, a subprocess's) takes effect at once.

    python -m steps.settings        # every setting, its value here and its meaning
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Setting:
    name: str
    default: str          # in words, as docs/settings.md shows it
    meaning: str


SETTINGS = (
    Setting("MERGEFORGE_RECIPES", "recipes/ of the checkout", "the directory `doit` reads recipes from"),
    Setting("MERGEFORGE_BUILD", "build/ of the checkout", "where each recipe's artifacts are placed "
            "(build/<recipe>/) and doit keeps its state (.doit.json)"),
    Setting("MERGEFORGE_STORE", "cache/ of the checkout", "the content-keyed store: entries, locks, stat cache, "
            "Hub downloads, servers' pid files"),
    Setting("MERGEFORGE_REMOTE", "(unset: none)", "a shared remote store, an fsspec URL (file://, s3://, gs://, "
            "hf://, sftp://): keys are pulled from it before building and pushed to it after"),
    Setting("MERGEFORGE_CLUSTER", "(unset: build here)", "run heavy stages as jobs through submitit: slurm, or "
            "local (a process here); the remote store (MERGEFORGE_REMOTE) hands the result back"),
    Setting("MERGEFORGE_CLUSTER_STAGES", "heal", "the kinds of stage run as jobs, comma-separated"),
    Setting("MERGEFORGE_CLUSTER_OPTIONS", "{}", "submitit's parameters as JSON, e.g. {\"slurm_partition\": "
            "\"gpu\", \"gpus_per_node\": 1, \"timeout_min\": 900}"),
    Setting("MERGEFORGE_CLUSTER_DIR", "<store>/jobs", "the jobs' folders (logs, the job's own workspace); on Slurm "
            "a path the nodes share"),
    Setting("MERGEFORGE_CLUSTER_DEVICE", "(unset: this machine's)", "the device the heal job computes on (cuda, "
            "cpu): it is in the heal's key, which the workstation computes before the job runs"),
    Setting("MERGEFORGE_HOME", "~/.cache/mergeforge", "the per-user cache: the built llama.cpp toolchain and "
            "downloaded wheels (shared by every checkout)"),
    Setting("MERGEFORGE_LLAMA_CPP", "(unset: build the pinned llama.cpp)", "a llama.cpp checkout or install to use "
            "instead of the built toolchain"),
    Setting("MERGEFORGE_THREADS", "the machine's CPU count", "threads for llama.cpp programs and the heal"),
    Setting("MERGEFORGE_GPU_LAYERS", "(unset: none)", "`-ngl N` for llama.cpp programs"),
    Setting("MERGEFORGE_MERGE_DEVICE", "cpu", "the torch device the arithmetic merge methods compute on (e.g. "
            "cuda); recorded in the merge key, since another device's arithmetic gives other bytes"),
    Setting("MERGEFORGE_HEAL_LAUNCH", "(unset: in process)", "a launcher command for the heal, e.g. `torchrun "
            "--nproc_per_node 2`; recorded in the heal key (its process count sets the global batch)"),
    Setting("MERGEFORGE_UPDATE", "(unset)", "resolve Hub sources' revisions again: 1 or all, a recipe name, or "
            "<recipe>:<source>, comma-separated (else build/<recipe>/lock.json's commits)"),
    Setting("MERGEFORGE_SANDBOX", "auto", "how generated code is confined: auto (bubblewrap, else it is not run), "
            "bwrap or rlimits (no isolation); overrides eval.sandbox"),
    Setting("MERGEFORGE_CHROMIUM", "(unset: Debian's chromium, else one on PATH)", "the Chromium the frontend "
            "tests drive"),
    Setting("MERGEFORGE_VERIFY_FULL", "0", "`doit verify` reads every byte, not only files changed since hashed"),
    Setting("MERGEFORGE_GC_KEEP", "3", "`doit gc`: recent store entries kept per stage besides the current ones"),
)
_NAMES = {s.name for s in SETTINGS}


def get(name: str) -> str | None:
    """The raw value of one declared setting (None when unset or empty)."""
    if name not in _NAMES:
        raise KeyError(f"{name} is not a mergeforge setting; declare it in steps/settings.py")
    return os.environ.get(name) or None


def _flag(name: str) -> bool:
    return (get(name) or "") not in ("", "0")


def root() -> Path:
    """The checkout: the directory holding dodo.py and steps/."""
    return Path(__file__).resolve().parent.parent


def recipes_dir() -> Path:
    return Path(get("MERGEFORGE_RECIPES") or root() / "recipes")


def build_root() -> Path:
    return Path(get("MERGEFORGE_BUILD") or root() / "build").resolve()


def store_root() -> Path:
    return Path(get("MERGEFORGE_STORE") or root() / "cache").resolve()


def remote() -> str | None:
    return get("MERGEFORGE_REMOTE")


def cluster() -> str:
    return (get("MERGEFORGE_CLUSTER") or "").strip().lower()       # steps.store.cluster checks it


def cluster_stages() -> tuple[str, ...]:
    return tuple(s.strip() for s in (get("MERGEFORGE_CLUSTER_STAGES") or "heal").split(",") if s.strip())


def cluster_options() -> dict[str, object]:
    import json
    text = get("MERGEFORGE_CLUSTER_OPTIONS") or "{}"
    try:
        value = json.loads(text)
    except ValueError as exc:
        from steps.errors import MergeforgeError
        raise MergeforgeError(f"MERGEFORGE_CLUSTER_OPTIONS is not JSON ({exc}); e.g. "
                              '{"slurm_partition": "gpu", "timeout_min": 900}') from None
    return dict(value)


def cluster_dir() -> Path:
    return Path(get("MERGEFORGE_CLUSTER_DIR") or store_root() / "jobs").resolve()


def cluster_device() -> str | None:
    return get("MERGEFORGE_CLUSTER_DEVICE")


def job_environment(workspace: Path) -> None:
    """In a cluster job (which inherits the submitter's environment): a build directory and store of the job's
    own, and no cluster (the job builds the stage itself)."""
    os.environ["MERGEFORGE_BUILD"] = str(workspace / "build")
    os.environ["MERGEFORGE_STORE"] = str(workspace / "store")
    os.environ.pop("MERGEFORGE_CLUSTER", None)


def home() -> Path:
    return Path(get("MERGEFORGE_HOME") or Path.home() / ".cache" / "mergeforge")


def llama_cpp() -> str | None:
    return get("MERGEFORGE_LLAMA_CPP")


def threads() -> int:
    return int(get("MERGEFORGE_THREADS") or os.cpu_count() or 1)


def gpu_layers() -> str | None:
    return get("MERGEFORGE_GPU_LAYERS")


def merge_device() -> str:
    return get("MERGEFORGE_MERGE_DEVICE") or "cpu"


def heal_launch() -> str:
    return (get("MERGEFORGE_HEAL_LAUNCH") or "").strip()


def update() -> str:
    return get("MERGEFORGE_UPDATE") or ""


def sandbox_mode() -> str:
    return (get("MERGEFORGE_SANDBOX") or "auto").strip().lower() or "auto"


def chromium() -> str | None:
    return get("MERGEFORGE_CHROMIUM")


def verify_full() -> bool:
    return _flag("MERGEFORGE_VERIFY_FULL")


def gc_keep() -> int:
    return int(get("MERGEFORGE_GC_KEEP") or "3")


if __name__ == "__main__":
    for s in SETTINGS:
        value = os.environ.get(s.name)
        print(f"{s.name:<24} {'= ' + value if value else '(default: ' + s.default + ')'}\n    {s.meaning}")
