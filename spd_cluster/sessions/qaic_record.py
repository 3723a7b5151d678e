"""The compiler a card job's ``qaic-compile`` call reaches under the onnxruntime stand-in.

QEfficient's ``compile()`` writes ``specializations.json`` and ``custom_io.yaml`` and then runs
``qaic-compile ... -aic-binary-dir=QPC``. With ``runtime: onnxruntime`` that command runs this
file instead (``QEfficient.utils.constants.COMPILER`` is swapped for the call): it writes the
command line, as the card's compiler would have received it, to ``QPC/compile_command.json``
and compiles nothing. ``OrtQpcSession`` reads it back to find the ONNX graph and the compiled
specialisations. Run as a script: it imports nothing of spd_cluster (nor torch).
"""

import json
import sys
from pathlib import Path

RECORD = "compile_command.json"


def main(argv: list[str]) -> int:
    real, args = argv[0], argv[1:]  # the compiler QEfficient would have run, then its flags
    out = next((a.split("=", 1)[1] for a in args if a.startswith("-aic-binary-dir=")), None)
    if out is None:
        print("qaic_record: no -aic-binary-dir= in the compiler command", file=sys.stderr)
        return 2
    Path(out).mkdir(parents=True, exist_ok=True)
    record = {"command": [real, *args], "executed": False,
              "note": "recorded by spd_cluster's onnxruntime stand-in instead of running qaic-compile"}
    (Path(out) / RECORD).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
