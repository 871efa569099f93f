"""Stop strings in streamed text: a stop string may arrive split over several tokens, so any tail
that could begin one is held back until the next piece settles it."""

from __future__ import annotations


class StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that might begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was reached."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i != -1]
        if hits:
            text, self.pending = self.pending[:min(hits)], ""
            return text, True
        hold = max((_overlap(self.pending, s) for s in self.stops), default=0)
        text, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return text, False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
