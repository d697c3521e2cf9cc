"""Progress of long work: a bar on a terminal, a line every 10% (or every 30 s) in a log."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

LOG_EVERY_FRACTION = 0.1  # a log line at each tenth of the work ...
LOG_EVERY_SECONDS = 30.0  # ... or after this long without one
LOG_AFTER_SECONDS = 5.0  # work shorter than this logs nothing: a log keeps only what was long


class LogProgress:
    """What a bar shows, as a few lines for a log file (stderr not a terminal): ``description: 40% (4/10 unit)``
    at each tenth of the work, or after :data:`LOG_EVERY_SECONDS` without a line, once the work has run
    :data:`LOG_AFTER_SECONDS`; the same calls as a tqdm bar."""

    def __init__(self, total: int, description: str, unit: str, write: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.description, self.unit = total, description, unit
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.clock = clock
        self.n = 0
        self._tenth = 0
        self._start = self._last = clock()

    def update(self, n: int = 1) -> None:
        self.n += n
        tenth = (self.n * round(1 / LOG_EVERY_FRACTION)) // self.total if self.total else 0  # integers: no float drift
        now = self.clock()
        if now - self._start < LOG_AFTER_SECONDS:
            self._tenth = tenth
            return
        if tenth > self._tenth or now - self._last >= LOG_EVERY_SECONDS:
            self._tenth, self._last = max(tenth, self._tenth), now
            share = f"{self.n / self.total:.0%} " if self.total else ""
            self.write(f"{self.description}: {share}({self.n}/{self.total} {self.unit})")

    def close(self) -> None:
        pass

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int, enabled: bool | None, description: str, unit: str) -> Any:
    """Progress on stderr for work of ``total`` items: a tqdm bar on a terminal, log lines otherwise
    (:class:`LogProgress`); ``enabled`` False shows nothing, None shows it when there is more than one item."""
    from tqdm import tqdm

    if enabled is False or (enabled is None and total <= 1):
        return tqdm(total=total, disable=True)
    if not sys.stderr.isatty():
        return LogProgress(total, description, unit)
    return tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False)
