"""Training of multi-projection heads (``spd-cluster train-heads``)."""

from .heads import TrainingError, TrainSettings, add_cli, read_prompts, train, train_heads

__all__ = ["TrainingError", "TrainSettings", "add_cli", "read_prompts", "train", "train_heads"]
