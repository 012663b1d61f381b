"""The stages of training: what the one loop learns from and is scored on (the Stage interface of
base.py). The registry below is the one place that knows them; the loop, the plan, the samples and
`qwen3 eval` reach a stage through it by the run's `stage` name."""

from __future__ import annotations

from qwen3.config import ConfigError
from qwen3.train.stages.base import BatchSource, Score, Stage
from qwen3.train.stages.dpo import PreferenceOptimization
from qwen3.train.stages.pretrain import Pretraining
from qwen3.train.stages.rl import ReinforcementLearning
from qwen3.train.stages.sft import ChatFineTuning

STAGES: dict[str, type[Stage]] = {stage.name: stage for stage in (Pretraining, ChatFineTuning,
                                                                   ReinforcementLearning, PreferenceOptimization)}

__all__ = ["STAGES", "BatchSource", "Score", "Stage", "stage_class"]


def stage_class(name: str) -> type[Stage]:
    """The stage a run's `stage` names; a ConfigError naming the known ones for any other."""
    if name not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(map(repr, STAGES))}, got {name!r}")
    return STAGES[name]
