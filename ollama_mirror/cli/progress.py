"""Progress on a terminal for the ``ollama-mirror`` command: one bar per blob, or plain lines.

On a terminal each item redraws one line in place; anywhere else (a log, a pipe, CI) each item
gets a line when it starts, about every ten seconds while it moves, and when it ends, so logs stay
readable.  Progress always goes to standard error: standard output is for results (``ls --json``,
``export -o -``).
"""

from __future__ import annotations

import time
from typing import TextIO

from ..units import human_size

PLAIN_INTERVAL = 10.0
TTY_INTERVAL = 0.1
BAR_WIDTH = 24


class Progress:
    """Reports items (blobs) one after another on *stream*; ``quiet`` reports nothing."""

    def __init__(self, stream: TextIO, quiet: bool = False, tty: bool | None = None) -> None:
        self._stream = stream
        self._quiet = quiet
        self._tty = stream.isatty() if tty is None else tty
        self._label = ""
        self._total = 0
        self._done = 0
        self._started = 0.0
        self._drawn = 0.0
        self._open = False
        self._note = ""
        self._note_since = 0.0

    def start(self, label: str, total: int) -> None:
        self.finish()
        self._end_note()
        self._label, self._total, self._done = label, total, 0
        self._started = self._drawn = time.monotonic()
        self._open = True
        if self._tty:
            self._draw()

    def update(self, done: int) -> None:
        """The item has *done* bytes so far."""
        if not self._open:
            return
        self._done = done
        now = time.monotonic()
        if now - self._drawn >= (TTY_INTERVAL if self._tty else PLAIN_INTERVAL):
            self._drawn = now
            if self._tty:
                self._draw()
            else:
                self._line(
                    f"{self._label}: {self._percent()} ({human_size(done)} of {human_size(self._total)})"
                )

    def advance(self, count: int) -> None:
        self.update(self._done + count)

    def finish(self, note: str = "done") -> None:
        """End the current item (if any) with *note*."""
        if not self._open:
            return
        self._open = False
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = f", {human_size(self._done / elapsed)}/s" if self._done and elapsed >= 0.5 else ""
        text = f"{self._label}: {note} ({human_size(self._total)}{rate})"
        if self._tty:
            self._stream.write("\r\033[K")
        self._line(text)

    def note(self, text: str) -> None:
        """A state with no bytes to count (``pulling manifest``, waiting for the upstream): on a terminal
        drawn in place with the seconds it has lasted; elsewhere a line when it changes, then one about
        every ten seconds while it lasts."""
        now = time.monotonic()
        if text != self._note:
            self.finish()
            self._note, self._note_since, self._drawn = text, now, 0.0
        elif now - self._drawn < (TTY_INTERVAL if self._tty else PLAIN_INTERVAL):
            return
        self._drawn = now
        waited = now - self._note_since
        shown = f"{text} ({waited:.0f} s)" if waited >= 1 else text
        if self._quiet:
            return
        if self._tty:
            self._stream.write(f"\r\033[K{shown}")
            self._stream.flush()
        else:
            self._line(shown)

    def message(self, text: str) -> None:
        """A line of its own (a model done, a summary)."""
        self.finish()
        self._end_note()
        self._line(text)

    def _end_note(self) -> None:
        if self._note and self._tty and not self._quiet:
            self._stream.write("\r\033[K")
        self._note = ""

    def _percent(self) -> str:
        return f"{100 * self._done / self._total:.0f}%" if self._total else "100%"

    def _draw(self) -> None:
        if self._quiet:
            return
        fraction = self._done / self._total if self._total else 1.0
        filled = int(BAR_WIDTH * min(1.0, fraction))
        bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"
        sizes = f"{human_size(self._done)}/{human_size(self._total)}"
        self._stream.write(f"\r\033[K{self._label} {bar} {self._percent():>4} {sizes}")
        self._stream.flush()

    def _line(self, text: str) -> None:
        if not self._quiet:
            self._stream.write(text + "\n")
            self._stream.flush()
