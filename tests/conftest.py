import os

# Ray must use loopback for every address in tests (never the machine's outward IP).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tests use tiny models: one intra-op thread avoids OpenMP spin contention on a busy 2-core box.
torch.set_num_threads(1)

# The QEfficient lane (`make test-qaic`, .venv-qaic) runs the tests of QEfficient's real graphs;
# the current-releases lane (.venv) has no QEfficient and does not collect them. The lane sets
# SPD_CLUSTER_QEFF_LANE=1 so that a broken QEfficient install fails instead of running less.
import importlib.util  # noqa: E402

HAVE_QEFFICIENT = importlib.util.find_spec("QEfficient") is not None
if os.environ.get("SPD_CLUSTER_QEFF_LANE") == "1" and not HAVE_QEFFICIENT:
    raise RuntimeError("SPD_CLUSTER_QEFF_LANE=1 but QEfficient is not installed here: run `make setup-qaic`")
collect_ignore = [] if HAVE_QEFFICIENT else ["test_qeff_standin.py"]
