"""A terminal console that also appends everything it prints to a run's log file, and quieting a library's
loggers for the length of one call."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console


@contextlib.contextmanager
def loggers_at(level: int, *names: str) -> Iterator[None]:
    """The named loggers at `level` inside the block, and at the levels they had again after it (also when
    it raises): a backend's chatter is quieted for one call, never for the process."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(level)
        yield
    finally:
        for logger, was in zip(loggers, before):
            logger.setLevel(was)


class TeeConsole(Console):
    """Prints to the terminal as usual and, as plain text, to `log_path` (line-buffered, so a killed run
    keeps its log up to the last line). Live progress bars stay on the terminal only."""

    def __init__(self, log_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives with the console)
        self._log = Console(file=self._log_file, width=120, no_color=True, highlight=False, soft_wrap=True)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*objects, **kwargs)
        self._log.print(*objects, **kwargs)

    def rule(self, *args: Any, **kwargs: Any) -> None:
        super().rule(*args, **kwargs)
        self._log.rule(*args, **kwargs)

    def log_only(self, text: str) -> None:
        """Write a line to the log file only (the terminal shows it another way)."""
        self._log.print(text)

    def log_exception(self) -> None:
        """Write the exception being handled to the log file only."""
        self._log.print_exception()

    def close(self) -> None:
        self._log_file.close()
