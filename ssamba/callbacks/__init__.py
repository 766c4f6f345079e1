"""Lightning callbacks that keep long runs safe: exact resume, pre-emption checkpoints, non-finite steps."""
from ssamba.callbacks.nonfinite import NonFiniteGuard, NonFiniteTrainingError
from ssamba.callbacks.periodic import PeriodicCheckpoint
from ssamba.callbacks.preemption import PreemptionCheckpoint
from ssamba.callbacks.random_state import RandomStateCheckpoint
from ssamba.callbacks.resume_points import EveryEpochLastCheckpoint

__all__ = ["EveryEpochLastCheckpoint", "NonFiniteGuard", "NonFiniteTrainingError", "PeriodicCheckpoint",
           "PreemptionCheckpoint", "RandomStateCheckpoint"]
