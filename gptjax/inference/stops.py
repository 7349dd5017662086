"""Stop strings: a continuation's text, decoded as its ids come, ended at the first stop string.

A stop string can end in the middle of a token, or span several, so the cut is made in the text:
the ids go through an incremental UTF-8 decoder, and each new piece is searched from the last
place where a stop string could have begun. The stop string itself is never part of the text.
For streaming, `take` holds back a tail that could still grow into a stop string.
"""

from __future__ import annotations

import codecs

from gptjax.errors import UserError


def check_stops(stop) -> list[str]:
    """A list of stop strings from None, one string or a list of them; empty strings are refused."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise UserError(f"stop strings must be non-empty strings; got {s!r} in {stop!r}.")
    return stops


class StopText:
    """One continuation's text: `feed` it ids, true once a stop string has come; `take` the new text."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.longest = max((len(s) for s in stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.stopped = False
        self.given = 0  # characters handed out by take()

    def feed(self, ids: list[int]) -> bool:
        if self.stopped:
            return True
        begin = max(0, len(self.text) - self.longest + 1)  # a stop string that ends in the new text starts here or later
        self.text += self.decoder.decode(self.tokenizer.decode_bytes(ids))
        found = [i for i in (self.text.find(s, begin) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
        return self.stopped

    def finish(self) -> str:
        """The whole text, once no more ids will come (a partial character at the end becomes U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
            self.stopped = True
        return self.text

    def take(self) -> str:
        """The text not handed out yet, less a tail that may be the beginning of a stop string."""
        end = len(self.text)
        if not self.stopped:
            end -= max((n for n in range(1, self.longest) if any(s.startswith(self.text[-n:]) for s in self.stops)
                        and n <= len(self.text)), default=0)
        piece, self.given = self.text[self.given:max(end, self.given)], max(end, self.given)
        return piece
