"""The SpD engine: pure Python over the device-session contract, no Ray.

Names are imported when first used (PEP 562), so that importing ``spd_cluster.engine.settings``
(the job config does) costs no numpy, torch or transformers import.
"""

from importlib import import_module

_EXPORTS = {
    "build_engine": "build", "check_models": "build", "PromptError": "engine", "SpDEngine": "engine",
    "CloudAI100ExecInfo": "metrics", "PromptResult": "metrics", "SpDPerfMetrics": "metrics",
    "DraftProposer": "proposers", "MultiProjProposer": "proposers", "NoProposer": "proposers",
    "PromptLookupProposer": "proposers", "Proposer": "proposers", "MODES": "modes", "mode": "modes",
    "SpDSettings": "settings", "Proposal": "proposers", "Verified": "verifier", "StepCost": "adaptive",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
