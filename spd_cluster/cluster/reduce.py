"""The reduce rules moved beside engine/metrics.py: engine/reduce.py (Ray-free, one definition of
each job figure and of every throughput). This module re-exports them for the code that still
imports them from here."""

from ..engine.reduce import (JobFigures, aggregate_exec_info, empty_metrics, first_batch_ttft,  # noqa: F401
                             metrics_from_record, reduce_metrics, reduce_records, throughput)
