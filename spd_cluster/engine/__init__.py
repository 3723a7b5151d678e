"""The SpD engine: pure Python over the device-session contract, no Ray."""

from .build import build_engine, check_models
from .engine import PromptError, SpDEngine
from .metrics import CloudAI100ExecInfo, PromptResult, SpDPerfMetrics
from .proposers import DraftProposer, MultiProjProposer, NoProposer, PromptLookupProposer, Proposer
from .settings import MODES, SpDSettings

__all__ = [
    "build_engine", "check_models", "PromptError", "SpDEngine", "CloudAI100ExecInfo", "PromptResult",
    "SpDPerfMetrics", "DraftProposer", "MultiProjProposer", "NoProposer", "PromptLookupProposer",
    "Proposer", "MODES", "SpDSettings",
]
