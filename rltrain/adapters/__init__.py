"""Spans -> training data: token rows for GRPO/PPO (:mod:`.trajectories`), advantages (:mod:`.advantages`)
and readable transcripts for APO (:mod:`.transcripts`). Pure Python: nothing here imports torch or TRL."""

from rltrain.adapters.advantages import (
    UNPARSEABLE,
    AdvantageResult,
    GroupStats,
    answer_distribution,
    collapse_warning,
    gae,
    group_advantages,
    whiten,
)
from rltrain.adapters.trajectories import AdapterError, AdapterResult, TrajectoryAdapter
from rltrain.adapters.transcripts import GradeRecord, ToolRecord, Transcript, transcript_of

__all__ = [
    "UNPARSEABLE",
    "AdapterError",
    "AdapterResult",
    "AdvantageResult",
    "GradeRecord",
    "GroupStats",
    "ToolRecord",
    "TrajectoryAdapter",
    "Transcript",
    "answer_distribution",
    "collapse_warning",
    "gae",
    "group_advantages",
    "transcript_of",
    "whiten",
]
