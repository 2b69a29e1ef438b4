"""Problems with what a user gave us (a profile, its data, a launch on this machine).

Kept apart from the profile schema so that reporting them needs no pydantic import.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Problem:
    """One thing wrong with a profile, located as precisely as we can."""

    path: str  # dotted YAML path, "" for the whole file
    message: str
    file: str | None = None
    line: int | None = None

    def format(self) -> str:
        where = self.file or "<profile>"
        if self.line:
            where += f":{self.line}"
        field_ = f" {self.path}:" if self.path else ""
        return f"{where}:{field_} {self.message}"


class ProfileError(Exception):
    """Raised with every problem found; ``str()`` is the full human report."""

    def __init__(self, problems: list[Problem], file: str | None = None):
        self.problems = problems
        self.file = file
        super().__init__(self.report())

    def report(self) -> str:
        n = len(self.problems)
        head = f"{self.file or 'profile'}: {n} problem{'s' if n != 1 else ''}"
        return "\n".join([head] + ["  " + p.format() for p in self.problems])
