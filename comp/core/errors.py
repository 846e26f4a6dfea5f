"""User-facing errors: one line naming the file and the problem, exit code 2."""

from __future__ import annotations

import os


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2, no traceback."""

    def __init__(self, where: str | os.PathLike, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")
