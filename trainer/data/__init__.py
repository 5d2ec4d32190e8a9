"""The trainer's data: a token-exact, scheduled, packed, rank-sharded and exactly resumable mixture."""

from cpt.trainer.data.config import DataConfig, ScheduleConfig, SourceConfig
from cpt.trainer.data.evalset import eval_sequences
from cpt.trainer.data.loader import MixtureLoader
from cpt.trainer.data.sources import check_sources
from cpt.trainer.data.trace import trace_lines

__all__ = [
    "DataConfig",
    "MixtureLoader",
    "ScheduleConfig",
    "SourceConfig",
    "check_sources",
    "eval_sequences",
    "trace_lines",
]
