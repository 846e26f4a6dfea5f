"""Messages of the stages: one `comp` logger, progress at INFO on stdout, warnings on stderr, details at DEBUG.

A command's own result (a score, a table, the file it wrote) is printed by the CLI; what the stages say on the
way goes through here, so `-q` keeps only warnings and results and `-v` adds the details.
"""

from __future__ import annotations

import logging
import os
import sys

LOG = logging.getLogger("comp")
RESULT = 25  # between INFO and WARNING: a stage's result table, kept by -q (-qq keeps warnings only)
logging.addLevelName(RESULT, "RESULT")


class _Console(logging.Handler):
    """INFO and DEBUG to the current sys.stdout, WARNING and above to the current sys.stderr (looked up per record,
    so captured or redirected streams get the messages)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()  # progress lines must show while a long stage runs
        except Exception:  # noqa: BLE001 - logging's own contract: a broken stream never raises into the work
            self.handleError(record)


def progress(iterable, hide: bool = False, **kwargs):
    """A tqdm bar over iterable; `hide` where the caller finds it not worth showing, and always hidden under -q
    (TQDM_DISABLE only sets tqdm's default, which an explicit `disable` overrides)."""
    from tqdm import tqdm  # here, as the callers had it: importing comp.core.log stays free of tqdm

    return tqdm(iterable, disable=hide or LOG.getEffectiveLevel() > logging.INFO, **kwargs)


def result(msg: str) -> None:
    """A result line (kept by -q)."""
    LOG.log(RESULT, msg)


def _install() -> None:
    """One console handler on the `comp` logger (at import: library calls and tests see the messages too)."""
    if not any(isinstance(h, _Console) for h in LOG.handlers):
        h = _Console()
        h.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(h)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False


def set_verbosity(quiet: int = 0, verbose: int = 0) -> None:
    """-q: results and warnings, no progress bars; -qq: warnings only; -v: details too (DEBUG)."""
    level = logging.WARNING if quiet > 1 else RESULT if quiet else logging.DEBUG if verbose > 0 else logging.INFO
    LOG.setLevel(level)
    if quiet > 0:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm reads TQDM_* defaults from the environment (forked workers inherit it)


_install()
