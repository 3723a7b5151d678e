"""`spd-cluster validate`'s checks: the preflight stage (cluster/preflight.py). This module keeps
the names it has always had for callers that import them from here."""

from .preflight import (HUB_TIMEOUT_S, Check, Preflight, actor_needs, hf_model, locate_model,  # noqa: F401
                        preflight)
