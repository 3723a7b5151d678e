"""Device sessions: one model on one device, behind the contract in ``base``."""

from .base import DeviceSession, SessionInputError
from .loader import eos_token_ids, load_model, load_session, load_tokenizer

__all__ = ["DeviceSession", "SessionInputError", "eos_token_ids", "load_model", "load_session", "load_tokenizer"]
