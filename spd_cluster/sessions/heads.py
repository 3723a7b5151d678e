"""Turbo-format multi-projection heads (the format QEfficient's multiproj example reads).

A directory holds ``speculator_config.json`` (``turbo_num_heads`` H, ``turbo_num_layers`` L, and
whatever else the trainer records) and ``speculator.safetensors`` with
``projections.{h}.{l}.linear.weight`` [hidden, hidden] and ``.bias`` [hidden]. Head h applies L
ResBlocks (``x + SiLU(W x + b)``) to the target's last hidden state; the model's own lm_head
then turns it into the logits of the token h + 1 further on than the base logits.

Optional ``head_vocab`` in the config (token ids, written by our trainer: the tokens its heads were
trained to predict) restricts the heads' logits to those tokens: a session then applies only
those rows of the lm_head to the heads, which for a 150k-token vocabulary is most of their cost.
Proposals never leave that set; verification, and so the output, is unaffected.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG_FILE = "speculator_config.json"
WEIGHTS_FILE = "speculator.safetensors"


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # starts as identity + SiLU(b)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + nn.functional.silu(self.linear(x))


class TurboHeads(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_layers: int = 1, extra_config: dict | None = None):
        super().__init__()
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"need turbo_num_heads >= 1 and turbo_num_layers >= 1, got {num_heads}, {num_layers}")
        self.hidden_size, self.num_heads, self.num_layers = hidden_size, num_heads, num_layers
        self.extra_config = dict(extra_config or {})
        vocab = self.extra_config.pop("head_vocab", None)
        self.vocab = None if vocab is None else torch.as_tensor(vocab, dtype=torch.long)
        self.projections = nn.ModuleList(
            nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)]) for _ in range(num_heads)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., H + 1, D]: the base hidden state first, then each head's."""
        return torch.stack([hidden] + [p(hidden) for p in self.projections], dim=-2)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {**self.extra_config, "turbo_num_heads": self.num_heads, "turbo_num_layers": self.num_layers,
                  "hidden_size": self.hidden_size}
        if self.vocab is not None:
            config["head_vocab"] = self.vocab.tolist()
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        tensors = {f"projections.{k}": v.detach().float().contiguous().cpu() for k, v in self.projections.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))

    @classmethod
    def load(cls, directory: str | Path, hidden_size: int | None = None) -> "TurboHeads":
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{directory}: projection heads need {CONFIG_FILE} and {WEIGHTS_FILE}")
        config = json.loads(cfg_path.read_text())
        try:
            num_heads, num_layers = int(config["turbo_num_heads"]), int(config["turbo_num_layers"])
        except KeyError as e:
            raise ValueError(f"{cfg_path}: missing field {e.args[0]}") from None
        state = {k.removeprefix("projections."): v for k, v in load_file(str(w_path)).items()}
        found = state.get("0.0.linear.weight")
        if found is None:
            raise ValueError(f"{w_path}: no key projections.0.0.linear.weight")
        if hidden_size is not None and found.shape[-1] != hidden_size:
            raise ValueError(
                f"{w_path}: heads have hidden size {found.shape[-1]} but the model's hidden size is {hidden_size}"
            )
        heads = cls(int(found.shape[-1]), num_heads, num_layers, extra_config=config)
        heads.projections.load_state_dict(state, strict=True)
        return heads

    @staticmethod
    def find(model_dir: str | Path | None, speculator_path: str | Path | None) -> Path | None:
        """Heads given by path win; else heads saved in the model directory; else None."""
        for d in (speculator_path, model_dir):
            if d is not None and (Path(d) / CONFIG_FILE).is_file():
                return Path(d)
        if speculator_path is not None:
            raise FileNotFoundError(f"speculator_path {speculator_path}: no {CONFIG_FILE} there; train heads "
                                    f"there with: spd-cluster train-heads --model MODEL --dataset PROMPTS "
                                    f"--out {speculator_path} (docs/heads.md)")
        return None
