import os

# Ray must use loopback for every address in tests (never the machine's outward IP).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tests use tiny models: one intra-op thread avoids OpenMP spin contention on a busy 2-core box.
torch.set_num_threads(1)
