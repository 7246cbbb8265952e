"""The content-keyed store and the stage executor.

A stage's key hashes its kind, its normalized recipe subtree, the digests of its inputs (upstream outputs,
small input files) and its tool versions. ``execute`` restores a key already in the store (reflinks or hardlinks
into build/<recipe>/) or builds the stage in a temporary directory, hashes what it wrote, publishes it into the
store read-only with one atomic rename, and then places it. The stage's doit target, a small manifest of output
digests only, is written last: its bytes change only when an output's bytes change, which gives early cutoff
downstream. The executor knows no stage by name: it calls what each stage declares (steps.stage.Declaration).

    cache/store/<kk>/<key>/manifest.json + the stage's files     (complete once the directory exists)
    cache/locks/<key>.lock                                        (flock: one process builds a key at a time)
    cache/tmp/<kind>.<key>.<pid>.<random>/                        (a stage being built by process <pid>)
    cache/quarantine/<key>/                                       (an entry `doit verify` found corrupt)
    build/.lock                                                   (flock: one doit per build directory)
    build/<recipe>/<artifact>                                     (reflinks, or hardlinks, into the store)
    build/<recipe>/.mf/<kind>.<name>.json                         (doit target: output digests)
    build/<recipe>/.mf/<kind>.<name>.key                          (the stage's key and how it was placed)
    build/<recipe>/.mf/events.jsonl                               (what each run built or restored, and how long)

keys: the key and the stat-only uptodate check; locks: per-key and per-build-directory locks, doit's state file,
killed builds' leftovers; space: the estimate and the full disk; executor: build, publish, place, lock.json;
maintain: verify and gc.
"""
from __future__ import annotations

from steps.files import process_alive, read_json, write_json_atomic
from steps.stage import Context
from steps.store.executor import execute, write_lock
from steps.store.keys import entry, placed_is_current, stage_key, stat_cache
from steps.store.locks import (BuildDirBusy, key_lock, lock_build_dir, protect_doit_state, recover_state_file,
                               remove_stale_tmp)
from steps.store.maintain import gc, pull, verify
from steps.store.remote import push_all
from steps.store.space import SMALL_OUTPUT, DiskFull, check_space, estimate_bytes

__all__ = ["BuildDirBusy", "Context", "DiskFull", "SMALL_OUTPUT", "check_space", "entry", "estimate_bytes", "execute",
           "gc", "key_lock", "lock_build_dir", "placed_is_current", "process_alive", "protect_doit_state", "pull",
           "push_all", "read_json", "recover_state_file", "remove_stale_tmp", "stage_key", "stat_cache", "verify",
           "write_json_atomic", "write_lock"]
