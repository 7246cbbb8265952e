"""What a run returns (SandboxResult), what a mode gives a language (Confinement), and the error for a mode
this machine cannot provide."""
from __future__ import annotations

from dataclasses import dataclass

from steps.errors import MergeforgeError


class SandboxUnavailable(MergeforgeError):
    """MERGEFORGE_SANDBOX asks for a mode this machine cannot provide."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed: str | None        # why the sandbox stopped it (timeout, output cap, memory, cpu time, file size) or None
    mode: str = ""            # "bwrap" or "rlimits"
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.killed is None


@dataclass(frozen=True)
class Confinement:
    """What a run of one language gets in one mode (``describe()``)."""
    mode: str
    user: str                    # "dedicated uid", "root" or "calling user"
    process_limit: str | None    # the mechanism bounding the task count, None when nothing does
    filesystem_isolated: bool    # only the working directory (and a private /tmp) writable, home and checkout unseen
    network_isolated: bool
