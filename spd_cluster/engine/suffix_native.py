"""Suffix decoding's index in C++ (``kernels/suffix_index.cpp``): engine/suffix.py's SuffixIndex,
the same layout, look-up and proposals, for a fraction of the host's time a step (issue 29: the
proposer's cost a step no more than prompt lookup's; in pure Python it was ~3x).

``NativeSuffixIndex`` has SuffixIndex's interface (add, open, extend, grow, context, match, draft,
len, toks, base, num_tokens, num_keys); ``step`` is a proposer's step for one row in one call (grow
the row's index, draft from it and from the job's, keep the better), which SuffixProposer uses when
the extension is there. The proposals are the pure-Python ones, token for token and probability
for probability, for token ids below 2**21 (tests/test_suffix.py compares them on random streams).

The extension is compiled on first use with the system C++ compiler through
``torch.utils.cpp_extension`` (pybind11 only, no libtorch headers: ~15 s on this machine), cached under
``~/.cache/torch_extensions`` by a digest of its source, as sessions/bf16.py's kernel is. Where that
fails, ``extension()`` is None and SuffixProposer keeps the pure-Python index;
``SPD_SUFFIX_NATIVE=0`` in the environment keeps it too (engine/suffix.py: ``native``).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .suffix_draft import NO_DRAFT, Draft

KERNELS = Path(__file__).resolve().parent / "kernels"
SOURCE = "suffix_index.cpp"
_ext, _error = None, None


def extension():
    """The compiled index module, building it on first call; None where it cannot be built."""
    global _ext, _error
    if _ext is None and _error is None:
        try:
            from torch.utils.cpp_extension import load

            digest = hashlib.sha1((KERNELS / SOURCE).read_bytes()).hexdigest()[:12]
            _ext = load(name=f"spd_suffix_index_{digest}", sources=[str(KERNELS / SOURCE)],
                        extra_cflags=["-O2"], verbose=False)
        except Exception as e:  # no compiler, no ninja, no torch...: the pure-Python index stays
            _error = e
            warnings.warn(f"suffix index extension unavailable, using the pure-Python index: {e}", stacklevel=2)
    return _ext


def _ints(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


class NativeSuffixIndex:
    """engine/suffix.py's SuffixIndex on the compiled index (the same arguments and methods; the
    attributes tests read, ``toks`` and ``base``, are copies out of it), with engine/suffix.py's RECENT
    given as ``recent``."""

    __slots__ = ("ix", "max_depth", "max_rows")

    def __init__(self, max_depth: int = 24, max_rows: Optional[int] = None, *, recent: int):
        """``recent``: occurrences of one key a look-up reads at most (engine/suffix.py's RECENT)."""
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth, self.max_rows = max_depth, max_rows
        self.ix = extension().Index(max_depth, -1 if max_rows is None else max_rows, min(recent, 2**62))

    def __len__(self) -> int:
        return self.ix.num_rows

    @property
    def rows(self) -> int:
        """Sequences stored (truthy where there are any, as SuffixIndex.rows is)."""
        return self.ix.num_rows

    @property
    def toks(self) -> list:
        """The stored tokens from ``base`` on, SEP before each sequence (a copy)."""
        return self.ix.tokens()

    @property
    def base(self) -> int:
        return self.ix.base

    @property
    def num_tokens(self) -> int:
        return self.ix.num_tokens

    def num_keys(self) -> int:
        return self.ix.num_keys()

    def add(self, tokens: Sequence[int], start: int = 0) -> None:
        self.ix.add(_ints(tokens), start)

    _add = add

    def open(self, tokens: Sequence[int]) -> None:
        self.ix.add(_ints(tokens), 0)

    def extend(self, seq) -> None:
        self.ix.extend(_ints(seq))

    def grow(self, seq, depth: int) -> list:
        return self.ix.grow(_ints(seq), depth)

    def context(self, depth: int) -> list:
        return self.ix.context(depth)

    def match(self, ctx: list) -> tuple[list[int], int]:
        return self.ix.match(ctx)

    def draft(self, ctx: list, limit: int, max_spec_factor: float = 1.0, min_prob: float = 0.1):
        tokens, probs, n, score = self.ix.draft(ctx, limit, max_spec_factor, min_prob)
        return Draft(tokens, probs, n, score) if n else NO_DRAFT
