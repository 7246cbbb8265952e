"""The sandbox's limits and fixed names, shared by every part of it (see the package docstring for what each
limit bounds)."""
LANGUAGES = ("python", "javascript", "sql", "pytest", "browser")
MODES = ("bwrap", "rlimits")
OUTPUT_CAP = 64 * 1024            # bytes kept of stdout and of stderr; one byte more kills the run
MAX_PROCS = 64                    # tasks (processes and threads) per run
FILE_SIZE_MB = 16                 # RLIMIT_FSIZE
WORK_TMPFS_MB = 64                # bwrap: the working directory's size
TMP_TMPFS_MB = 16                 # bwrap: /tmp and /dev/shm
NOFILE = 256
NODE_VM_HEADROOM_MB = 4096        # node's address-space reservations on top of memory_mb
NODE_DATA_HEADROOM_MB = 128
BROWSER_PROCS = 512               # browser: Chromium's processes and threads, and playwright's node driver
BROWSER_TMPFS_MB = 256            # browser: /tmp (its profile) and /dev/shm (its shared memory)
UID_BASE = 1_600_000_000          # dedicated uids: UID_BASE + (pid << 8 | run counter), no user of the host
WORKDIR = "/sandbox"              # the working directory inside bwrap
ENV_MODE = "MERGEFORGE_SANDBOX"
_PREFIX = "mergeforge-sandbox-"
