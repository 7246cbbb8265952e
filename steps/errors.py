"""The project's exceptions, and the one place that turns them into a message for the user."""
from __future__ import annotations


class MergeforgeError(Exception):
    """Base of every error the project reports to the user."""


class RecipeError(MergeforgeError):
    """A recipe is invalid: the message names the file, the key and the fix."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}")


class ToolNotFound(MergeforgeError):
    """A llama.cpp program or script could not be found or built."""


class StepFailed(MergeforgeError):
    """A stage's external program failed."""


def user_message(exc: BaseException) -> str:
    if isinstance(exc, MergeforgeError):
        return f"mergeforge: {exc}"
    return f"mergeforge: unexpected {type(exc).__name__}: {exc}"


class UnsafePath(MergeforgeError):
    """A model directory holds a link that leads outside it (or its Hugging Face cache's blobs)."""
