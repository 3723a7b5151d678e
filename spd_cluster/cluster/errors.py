"""How a job ends other than completed: light on imports, so the command line can catch them
(and install its signal handler) before anything heavy loads."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional


class JobError(RuntimeError):
    """The job could not finish (every pair failed, or a shard failed past its retries)."""


class JobCancelled(KeyboardInterrupt):
    """SIGINT or SIGTERM (what `ray job stop` sends) ended the job; raised by the CLI's handler.
    Raised inside ``ray.wait`` it comes out as a plain KeyboardInterrupt (Ray's check_status
    makes a new one), so the handler also leaves the signal in ``received``. While the driver
    writes a job's last records (``held``) a signal is only noted: the job ends right after, and
    its output says how it ended."""

    received: Optional[int] = None
    holding = False

    @classmethod
    @contextmanager
    def held(cls) -> Iterator[None]:
        cls.holding = True
        try:
            yield
        finally:
            cls.holding = False

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @classmethod
    def signal_of(cls, e: KeyboardInterrupt) -> int:
        import signal

        return getattr(e, "signum", None) or cls.received or signal.SIGINT
