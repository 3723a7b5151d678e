"""Imported first by every bench script: this tree's ``spd_cluster`` ahead of an installed
(editable) one, in this process and in every process it starts (Ray's workers, through
PYTHONPATH), so a benchmark run from an exported tree (``git archive``) measures that tree's code
and not the checkout the virtual environment was installed from."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(REPO)]:
    sys.path.insert(0, str(REPO))
_rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *_rest])
