"""What the driver and a pair's target actor send each other (the scheduler's side in
cluster/schedule.py, the actor's in cluster/actors.py): typed, so neither side indexes the other's
dicts or lists by position.

    ShardRequest  driver -> target actor: a shard to run, its attempt, the prompts the audit re-runs
    ShardDone     target actor -> driver: the shard's record (its shards.parquet row; the rows
                  themselves are in the shard's results file, which the actor wrote)
    LiveCounts    target actor -> driver: what the shard running now has finished (the bar)

Exactly-once is checked where rows cross: ``rows_once`` before a shard's file is written (one
result per prompt sent, by id), ``ShardDone.check`` when the driver takes a record
(the record is the shard asked for, with its every row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from ..io.dataset import Shard


@dataclass(frozen=True)
class ShardRequest:
    shard: "Shard"
    attempt: int = 1
    audit: tuple[int, ...] = ()  # positions, among the prompts the shard runs, that the audit re-runs

    @property
    def shard_id(self) -> int:
        return self.shard.shard_id


@dataclass
class ShardDone:
    """A shard written: its record as io.results.shard_record made it (``audit``: the audit's rows
    of the shard, which audit.parquet keeps; shards.parquet keeps the rest)."""

    record: dict[str, Any]
    shard_id: int = field(init=False)
    pair_id: Optional[int] = field(init=False)

    def __post_init__(self) -> None:
        self.shard_id = int(self.record["shard_id"])
        self.pair_id = self.record.get("pair_id")

    @property
    def num_rows(self) -> int:
        return int(self.record["num_prompts"])

    @property
    def num_generated_tokens(self) -> int:
        return int(self.record.get("num_generated_tokens") or 0)

    @property
    def audit_s(self) -> float:
        return float(self.record.get("audit_s") or 0.0)

    @property
    def batch_ttft(self) -> float:
        return float(self.record.get("batch_ttft") or 0.0)

    @property
    def node_id(self) -> Optional[str]:
        return self.record.get("node_id")

    def check(self, request: ShardRequest) -> "ShardDone":
        """The record is the shard asked for, every row of it: else the shard is not committed."""
        shard = request.shard
        if self.shard_id != shard.shard_id or self.num_rows != len(shard.rows):
            raise ValueError(f"shard {shard.shard_id} ({len(shard.rows)} rows) came back as shard "
                             f"{self.shard_id} with {self.num_rows} rows")
        return self


@dataclass(frozen=True)
class LiveCounts:
    shard_id: Optional[int] = None  # the shard running now (None: none yet)
    prompts: int = 0  # prompts finished
    tokens: int = 0  # their tokens
    steps: int = 0  # their speculative steps
    accepted: int = 0  # tokens those steps emitted


def rows_once(shard: "Shard", sent: Sequence, returned: Sequence) -> None:
    """The engine gave back one result per prompt sent, in order, by prompt id: each of the
    shard's runnable rows goes into its results file once (the rows the driver rejected are put
    in place by io.results.result_rows), none twice, none missing, none of another shard."""
    if len(returned) != len(sent) or any(a != b for a, b in zip(sent, returned)):
        missing = [x for x in sent if x not in set(returned)]
        raise RuntimeError(f"shard {shard.shard_id}: {len(sent)} prompts sent, {len(returned)} results back "
                           f"(not their ids, in order; missing e.g. {missing[:5]})")
