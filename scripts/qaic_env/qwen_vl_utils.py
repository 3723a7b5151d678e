"""Stand-in for the ``qwen_vl_utils`` package inside .venv-qaic (installed by ``make setup-qaic``).

``import QEfficient`` reaches its Qwen-VL modules, which import ``qwen_vl_utils``; the real package
imports torchvision, and the registry's torchvision wheels fail beside the CPU torch. Nothing on
the text-model path QEfficient takes for us calls these; a call says so instead of guessing.
"""


def _unavailable(*_args, **_kwargs):
    raise RuntimeError("qwen_vl_utils is a stand-in in this environment (no torchvision): "
                       "vision models are not supported here")


smart_resize = _unavailable
process_vision_info = _unavailable
