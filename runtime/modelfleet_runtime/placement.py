"""Where batches compute, inline on the event loop or in executor threads, revised from real batches' costs.

Pure (no clock, no loop): the batcher feeds it each batch's measured compute time and asks it before each
dispatch. Inline is for models whose batches cost less than a thread handoff; a model that costs
milliseconds must never run on the loop, so the rules are asymmetric (hysteresis):
- a batch's cost is the computing thread's CPU time where that is the whole compute (`cpu_is_cost`: a CPU
  backend computing on the calling thread, one intra-op thread), else its wall time. Wall time measured in an
  executor thread includes the wait for the GIL the busy loop holds (up to the 5 ms switch interval), so by
  wall time a tiny model sent to the executor under load never looked cheap enough to come back (4.4 s of 8 s
  at saturation on thread handoffs);
- batches move to the executor at the second batch in a row that costs at or over the threshold, not at the
  first: on a shared host one batch is stretched by preemption, and in a VM even the thread's CPU time
  counts the time the host stole (a tiny model's batch of 8 us "computed in 222 us"); one such batch must
  not send the next thousand through thread handoffs. The price is one more slow batch on the loop;
- back to inline only after `promote_after` real batches in a row all cost under it;
- even inline, a batch with more input elements than any batch measured under the threshold runs in the
  executor (and is measured there): a request at a shape never seen cannot block the loop on a guess.
Where the shapes served are known (the store's max shapes, or no dynamic non-batch axes), warm-up timed at
the max shapes is a trusted measurement and seeds the placement; otherwise it starts on the executor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Change:
    """A change of placement, for the log line and the gauge."""

    inline: bool
    reason: str


class Placement:
    """The current placement and the evidence behind it. Not thread-safe: use it from the loop only."""

    def __init__(
        self,
        *,
        threshold_s: float,
        promote_after: int,
        allowed: bool = True,
        trusted_elements: int = 0,
        cpu_is_cost: bool = False,
    ) -> None:
        """`trusted_elements` > 0: a measurement under the threshold at that many input elements (warm-up at
        the max shapes), so start inline; 0: start on the executor. `allowed` False: never go inline."""
        if promote_after < 1:
            raise ValueError("promote_after must be >= 1")
        self.threshold_s = threshold_s
        self.promote_after = promote_after
        self.allowed = allowed and threshold_s > 0
        self.cpu_is_cost = cpu_is_cost
        self._largest = trusted_elements if self.allowed else 0
        self.inline = self._largest > 0
        self._streak = 0  # cheap batches in a row
        self._slow = False  # the last batch cost at or over the threshold

    def runs_inline(self, elements: int) -> bool:
        """Whether a batch of `elements` input elements should compute on the loop."""
        return self.inline and elements <= self._largest

    def observe(self, elements: int, seconds: float, cpu_seconds: float | None = None) -> Change | None:
        """Account one real batch's compute time (wall, and the computing thread's CPU time if known); the
        change of placement it causes, if any."""
        cost = cpu_seconds if self.cpu_is_cost and cpu_seconds is not None else seconds
        if cost >= self.threshold_s:
            self._streak = 0
            if not self._slow:
                self._slow = True
                return None
            self._largest = 0
            if self.inline:
                self.inline = False
                return Change(False, f"two batches in a row cost over {self.threshold_s * 1e6:.0f} us, the last "
                                     f"{elements} input elements in {cost * 1e6:.0f} us")  # fmt: skip
            return None
        self._slow = False
        self._largest = max(self._largest, elements)
        if self.inline or not self.allowed:
            return None
        self._streak += 1
        if self._streak < self.promote_after:
            return None
        self.inline = True
        return Change(True, f"{self._streak} batches in a row computed under {self.threshold_s * 1e6:.0f} us")
