"""Training of multi-projection heads (``spd-cluster train-heads``), one module per stage:
``data`` (prompts, distillation rows) -> ``model`` (heads, frozen readout) -> ``loop`` (training,
evaluation) -> ``export`` (the whole job, saving, its report) -> ``cli``."""

from .cli import add_cli, settings_from_args
from .data import Distilled, TrainingError, TrainSettings, distill, read_prompts
from .export import advice, check_out_dir, format_accuracy, train_heads
from .loop import evaluate, train

__all__ = ["Distilled", "TrainingError", "TrainSettings", "add_cli", "advice", "check_out_dir", "distill",
           "evaluate", "format_accuracy", "read_prompts", "settings_from_args", "train", "train_heads"]
