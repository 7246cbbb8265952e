"""doit's console report, kept short: a task that did not run because a task it needs failed is counted in one
line, not printed as a block of its own, and each failure's reason is printed once, last, where it is seen."""
from __future__ import annotations

from typing import Any

from doit.exceptions import UnmetDependency
from doit.reporter import ConsoleReporter


class Reporter(ConsoleReporter):
    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        super().__init__(outstream, options)
        self.not_run: list[str] = []

    def add_failure(self, task: Any, fail: Any) -> None:
        if isinstance(fail, UnmetDependency):
            self.not_run.append(task.name)
            return
        if fail.report:
            self.failures.append({"task": task, "exception": fail})
            self.write(f"FAILED {task.name} (the reason follows at the end)\n")

    def complete_run(self) -> None:
        for result in self.failures:              # what a quiet task (verbosity 0 or 1) printed, as doit shows it
            task = result["task"]
            if not task.executed or task.verbosity >= 2:
                continue
            err = "".join(a.err for a in task.actions if a.err)
            out = "".join(a.out for a in task.actions if a.out) if task.verbosity < 2 else ""
            if err.strip() or out.strip():
                self.write(f"{task.name} printed:\n{err}{out}\n")
        if self.not_run:
            more = len(self.not_run) - 4
            shown = ", ".join(self.not_run[:4]) + (f" and {more} more" if more > 0 else "")
            self.write(f"not run: {len(self.not_run)} tasks, since a task they need failed ({shown})\n")
        reasons: dict[str, list[str]] = {}
        for result in self.failures:
            reasons.setdefault(result["exception"].get_msg().strip(), []).append(result["task"].name)
        for reason, names in reasons.items():
            named = reason.startswith("mergeforge: ")      # a reason of ours names its stage itself
            self.write(f"{reason}\n" if named else f"{', '.join(names)} failed:\n{reason}\n")
        if self.runtime_errors:
            self.write("#" * 40 + "\nExecution aborted.\n" + "\n".join(self.runtime_errors) + "\n")
