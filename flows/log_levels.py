"""The level at which each line of a stage's output reaches the Prefect log: DEBUG for advice and for noise
known to be benign, INFO for everything else (a failing stage's own error line and any other traceback
included)."""
from __future__ import annotations

import logging
import re

# Lines that are advice or known-benign noise, not news.
NOISE = ("To track the changes with git, run:", "git add dvc.lock", "To enable auto staging, run:",
         "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.",
         "Actor with class name: 'PreemptionWatcher'")  # Ray Train V2 warns of its own actor at error level
# Warnings that Ray prints with a traceback and calls safe to ignore: Ray Train's controller gives its
# autoscaling coordinator 5 s to answer, which a CPU-starved machine misses ("If this only happens
# transiently during network partition or CPU being overloaded, it's safe to ignore this error").
BENIGN_WITH_TRACEBACK = ("Failed to send resource request for train-",)
# "(TrainController pid=123) " as Ray prefixes a worker's or an actor's lines, colour codes included.
RAY_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\(\w+ pid=\d+(?:, ip=[\d.]+)?\)(?:\x1b\[0m)? ?")
EXCEPTION_LINE = re.compile(r"^[\w.]+(?:Error|Exception|Timeout\w*|Interrupt)\b.*")


class OutputLevels:
    """Call with each line of one stage's output, in order; returns logging.DEBUG or logging.INFO.

    After a BENIGN_WITH_TRACEBACK warning, the traceback that follows it from the same Ray process (its
    "Traceback (most recent call last):" line, the indented frames, the exception line that ends it) is
    DEBUG too; the first other line from that process ends it."""

    def __init__(self):
        self._quiet: str | None = None  # the Ray prefix whose traceback is being demoted

    def __call__(self, line: str) -> int:
        match = RAY_PREFIX.match(line)
        prefix, body = (match.group(0).strip(), line[match.end():]) if match else ("", line)
        if any(n in line for n in BENIGN_WITH_TRACEBACK):
            self._quiet = prefix
            return logging.DEBUG
        if self._quiet is not None and prefix == self._quiet:
            if body.startswith(("Traceback (most recent call last):", " ", "\t")):
                return logging.DEBUG
            self._quiet = None
            if EXCEPTION_LINE.match(body):  # the traceback's last line
                return logging.DEBUG
        return logging.DEBUG if any(n in line for n in NOISE) else logging.INFO
