"""Settings of one SpD run, validated before any model work."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .modes import MODES

Mode = Literal[MODES]


class SpDSettings(BaseModel):
    """The `spd:` section of a job config; the seed scripts' flags map onto it one to one."""

    model_config = ConfigDict(extra="forbid")

    num_speculative_tokens: int = Field(
        4, ge=1, description="k: with adaptive_k off, every step proposes k tokens a row (fewer only where the row "
                             "may emit fewer, or the proposer has fewer: a lookup with no match, heads under "
                             "confidence_threshold): the seed's meaning. With adaptive_k on, the most a step proposes")
    adaptive_k: bool = Field(
        True, description="each step proposes the number of tokens (0 to k) that maximises the expected tokens per "
                          "second, from each row's acceptance in this shard (greedy or sampled) and the target's "
                          "step-cost curve measured at load, with probes so that it never stops for good and a "
                          "guard that keeps a shard within ~2% of target-only speed (engine/adaptive.py); "
                          "off: always k")
    overlap_draft: bool = Field(
        False, description="draft mode, greedy: the draft drafts what follows this window while the target "
                           "verifies it; that guess is used when all of the window is accepted and the target's "
                           "next token is the draft's own (engine/overlap.py). For a draft on its own device")
    draft_vocab: Optional[int] = Field(
        None, ge=1, description="draft mode, cpu/cuda drafts: the draft proposes from the first this many token ids "
                                "(byte-level BPE numbers the most frequent first) and the ids its row has seen, "
                                "so each draft forward skips the rest of its lm_head (sessions/readout.py); the "
                                "output is the target's either way. null: the whole vocabulary")
    max_ngram_size: int = Field(3, ge=1, description="pld (and multiproj with prompt_lookup): longest n-gram looked up")
    prompt_lookup: bool = Field(
        False, description="multiproj: also look the row's tail up in its own text; propose what followed when that "
                           "is longer than the heads' confident guesses and starts with the same token")
    confidence_threshold: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="draft/multiproj: stop proposing once the product of the proposals' probabilities (the "
                    "proposer's own estimate that all of them are accepted) falls below this; 0 = always k")
    suffix_max_depth: int = Field(
        24, ge=1, description="suffix: the longest suffix of a row matched against the indexes (tokens); "
                              "vLLM's suffix_decoding_max_tree_depth")
    suffix_max_spec_factor: float = Field(
        2.0, gt=0.0, description="suffix: a proposal has at most this many tokens per matched token (a longer "
                                 "match earns a longer proposal), and k at most; vLLM's suffix_decoding_max_spec_factor "
                                 "(its default 1.0; 2.0 here: a template's next field follows a value just written, "
                                 "a short match, docs/suffix.md)")
    suffix_min_prob: float = Field(
        0.1, ge=0.0, lt=1.0, description="suffix: stop a proposal before a token whose empirical probability (the "
                                         "product of the frequencies of the continuation so far) falls below this; "
                                         "vLLM's suffix_decoding_min_token_prob")
    suffix_cache_rows: int = Field(
        1000, ge=0, description="suffix: finished rows the job-wide index keeps (each pair's copy), the oldest "
                                "dropped first; 0 = proposals from the row's own text only")
    prefill_seq_len: int = Field(32, ge=1, description="prefill chunk length")
    ctx_len: int = Field(1024, ge=2, description="KV positions per slot (prompt + generation)")
    max_new_tokens: int = Field(128, ge=1, description="generated tokens per prompt, the prefill one included")
    full_batch_size: int = Field(4, ge=1, description="KV slots decoded together (continuous batching)")
    ignore_eos: bool = False
    chat_template: bool = False
    # sampling: temperature 0 is greedy (and exactly what greedy always was)
    temperature: float = Field(0.0, ge=0.0)
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass; 1 = off")
    seed: int = Field(0, description="job seed; each prompt's random draws depend on it, the prompt id and the "
                                     "position drawn (engine/sampling.py)")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def adapts(self) -> bool:
        """Adaptive k runs greedy and sampled alike. What a text depends on:

        * greedy: the prompt alone (any k, width, batch, mode);
        * sampled, baseline / pld / multiproj: the seed, the prompt id and the prompt alone. Their
          proposals are point masses, verified against the target's own draw at each position
          (engine/sampling.py), so they emit the target-only sampled text token for token,
          whatever k, the widths adaptive k chose, the batch or the pair;
        * sampled, draft: a sample of the same distribution (speculative sampling keeps it for any
          width), reproducible from the seed and the prompt id with adaptive_k off; with adaptive
          k on it also depends on the widths chosen (the batch, the measured step costs), since
          the draft's own draws decide where rejection sampling's corrections fall."""
        return self.adaptive_k

    @model_validator(mode="after")
    def _check(self) -> "SpDSettings":
        if self.ctx_len < self.prefill_seq_len:
            raise ValueError(
                f"ctx_len ({self.ctx_len}) must be >= prefill_seq_len ({self.prefill_seq_len})"
            )
        return self
