"""Ignite engines (trainer, volume evaluator) and their handlers."""

from .evaluator import DNPVolumeEvaluator, axial_axis
from .handlers import (
    AnomalyMetricsHandler,
    BestModelSaver,
    CalibrationHandler,
    CheckpointHandler,
    EarlyStop,
    ExportHandler,
    PeriodicValidation,
    ProgressBar,
    MapStatsHandler,
    TrainingLogger,
)
from .schedule import build_optimizer, cosine_lr, stage_lambdas
from .trainer import DNPTrainer
from .writer import SCORE_FIELDS, InferenceWriter
