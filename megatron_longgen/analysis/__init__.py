"""Reading logged runs and comparing LongGen with its full-attention baseline (`tools/compare_runs.py`)."""

from megatron_longgen.analysis.compare import plot, report
from megatron_longgen.analysis.runs import RunRecord, read_run

__all__ = ["RunRecord", "plot", "read_run", "report"]
