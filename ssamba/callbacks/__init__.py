"""Lightning callbacks that keep long runs safe (exact resume, pre-emption checkpoints, non-finite steps), show
classification results in W&B, say where a run's wall time goes, and show progress without stalling the GPU."""
from ssamba.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from ssamba.callbacks.periodic import PeriodicCheckpoint
from ssamba.callbacks.preemption import PreemptionCheckpoint
from ssamba.callbacks.progress import LazyMetricsProgressBar
from ssamba.callbacks.random_state import RandomStateCheckpoint
from ssamba.callbacks.resume_points import EveryEpochLastCheckpoint
from ssamba.callbacks.wall_times import WallTimes
from ssamba.callbacks.wandb_predictions import WandbPredictions

__all__ = ["EveryEpochLastCheckpoint", "LazyMetricsProgressBar", "NonFiniteGuard", "NonFiniteTrainingError",
           "PeriodicCheckpoint", "PreemptionCheckpoint", "RandomStateCheckpoint", "WallTimes", "WandbPredictions"]
