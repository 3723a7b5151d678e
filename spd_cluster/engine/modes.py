"""The mode registry: per SpD method, how its proposer is built, whether it needs a draft
session (and so how many actors a pair has) and whether the target computes projection heads.

Nothing else in the package compares mode strings: callers ask ``mode(name)`` for its ``Mode``.
Builders import their proposer when called, so the registry (which the job config reads) costs
no numpy or torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

# The roles a pair's actors take; a mode's ``roles`` says which a pair of it has. Each role is
# also the name of the job config's section that describes its model (``target:``, ``draft:``).
TARGET, DRAFT = "target", "draft"


@dataclass(frozen=True)
class Mode:
    name: str
    build: Callable  # (settings, target session, draft session or None) -> Proposer
    needs_draft: bool = False  # a draft session: its own actor on its own device
    uses_heads: bool = False  # the target session loads projection heads and computes them each verify
    speculates: bool = True  # False: the target alone, one token per step (no proposer work at all)
    job_cache: bool = False  # proposes from the job's finished outputs too: the job keeps a cache every pair shares

    @property
    def roles(self) -> tuple[str, ...]:
        """The actors of a pair in this mode, target first: the target alone, or target and draft."""
        return (TARGET, DRAFT) if self.needs_draft else (TARGET,)

    def loads_heads(self, role: str) -> bool:
        """Whether the session of ``role`` loads projection heads (the target, in a heads mode)."""
        return self.uses_heads and role == TARGET

    @property
    def actors_per_pair(self) -> int:
        return len(self.roles)

    def max_k(self, settings) -> int:
        """The most tokens one step may propose (adaptive k chooses from 0 up to it)."""
        return settings.num_speculative_tokens if self.speculates else 0


def _baseline(settings, target, draft):
    from .proposers import NoProposer

    return NoProposer()


def _pld(settings, target, draft):
    from .proposers import PromptLookupProposer

    return PromptLookupProposer(settings.max_ngram_size)


def _draft(settings, target, draft):
    if draft is None:
        raise ValueError("draft mode needs a draft session (or a proposer)")
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft and target vocabularies differ: {draft.vocab_size} vs {target.vocab_size} tokens")
    return draft_proposer(settings, draft)


def draft_proposer(settings, draft):
    """The draft side of a draft pair: a DraftProposer over the draft session (overlapped with the
    verify where the settings ask for it). In process it is the target's proposer; behind Ray it
    runs in the draft actor, which the target reaches through a RemoteDraftProposer."""
    from .proposers import DraftProposer

    return overlapped(DraftProposer(draft, settings.prefill_seq_len, sampling=settings,
                                    confidence_threshold=settings.confidence_threshold), settings)


def draft_overlaps(settings) -> bool:
    """Whether the draft drafts while the target verifies (spd.overlap_draft, greedy only); else
    the two take turns: one computes while the other waits."""
    return bool(settings.overlap_draft and not settings.sampling)


def overlapped(proposer, settings):
    """The draft proposer, overlapped with the verify where the settings ask for it (greedy)."""
    if draft_overlaps(settings):
        from .overlap import OverlappedDraft

        return OverlappedDraft(proposer)
    return proposer


def _multiproj(settings, target, draft):
    from .proposers import MultiProjProposer, PromptLookupProposer

    if target.num_heads < 1:
        raise ValueError("multiproj needs projection heads: none were found for the target model "
                         "(give speculator_path, or train them with `spd-cluster train-heads`)")
    lookup = PromptLookupProposer(settings.max_ngram_size) if settings.prompt_lookup else None
    return MultiProjProposer(target.num_heads, settings.confidence_threshold, lookup)


def _suffix(settings, target, draft):
    from .suffix import SuffixProposer

    return SuffixProposer(settings.suffix_max_depth, settings.suffix_max_spec_factor, settings.suffix_min_prob,
                          settings.suffix_cache_rows)


REGISTRY: dict[str, Mode] = {m.name: m for m in (
    Mode("draft", _draft, needs_draft=True),
    Mode("pld", _pld),
    Mode("multiproj", _multiproj, uses_heads=True),
    Mode("suffix", _suffix, job_cache=True),
    Mode("baseline", _baseline, speculates=False),
)}
MODES: tuple[str, ...] = tuple(REGISTRY)


def mode(name: str) -> Mode:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {name!r}") from None


def draft_model(cfg) -> Optional[str]:
    """The draft model a job config names, where its mode has a draft."""
    return cfg.draft.model if mode(cfg.mode).needs_draft and cfg.draft else None
