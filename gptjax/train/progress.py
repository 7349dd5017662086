"""What a run shows while it trains: the progress display (a bar in a terminal, plain lines in logs) and
the rate meter its tokens per second come from."""

from __future__ import annotations

import sys
import time

from gptjax.runtime.timing import fmt_time


class Progress:
    """Step lines at intervals; in a terminal, a bar that redraws after every step instead."""

    def __init__(self, total: int, log=print, bar: bool | None = None):
        self.total, self.log = total, log
        self.bar = (log is print and sys.stdout.isatty()) if bar is None else bar
        self.drawn = False

    def line(self, message: str) -> None:
        """A line that stays (evaluations, checkpoints, warnings)."""
        if self.drawn:
            sys.stdout.write("\r\033[K")
            self.drawn = False
        self.log(message)

    def step(self, done: int, loss: float, bpb: float, rate: float, eta: float, lr: float, at_interval: bool,
             epochs: dict[str, float] | None = None) -> None:
        """`epochs`: a mixture's epochs of each source read so far, by name (a source past 1 is repeating)."""
        text = f"loss {loss:.4f} | {bpb:.3f} bits/byte | lr {lr:.2e} | {rate:,.0f} tok/s | left {fmt_time(eta)}"
        if epochs:
            text += " | epochs " + " ".join(f"{name} {e:.2f}" for name, e in epochs.items())
        if self.bar:
            width = 24
            filled = int(width * done / max(self.total, 1))
            sys.stdout.write(f"\r\033[K{done:>6}/{self.total} [{'#' * filled}{'.' * (width - filled)}] {text}")
            sys.stdout.flush()
            self.drawn = True
        elif at_interval:
            self.log(f"step {done:>6} | {text}")


class Rate:
    """Tokens per second over the steps since the last reading (the first window includes compilation)."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.start, self.steps, self.last = time.time(), 0, 0.0

    def tick(self) -> None:
        self.steps += 1

    def read(self, reset: bool) -> float:
        if self.steps:
            self.last = self.steps * self.tokens_per_step / max(time.time() - self.start, 1e-9)
        if reset:
            self.start, self.steps = time.time(), 0
        return self.last
