"""Metrics: the PhysioNet Challenge 2022 scores, per item and aggregated per patient."""

from ssamba.metrics.challenge import (
    CLASS_WEIGHTS,
    MURMUR_CLASSES,
    OUTCOME_CLASSES,
    MacroAUROC,
    MurmurWeightedAccuracy,
    OutcomeCost,
    OutcomeWeightedAccuracy,
    PerClassRecall,
    UnweightedAverageRecall,
    challenge_cost,
    weighted_accuracy,
)
from ssamba.metrics.patient import (
    AGGREGATION_RULES,
    PatientChallengeMetrics,
    PatientPredictions,
    aggregate_patients,
    patient_scores,
)

__all__ = [
    "AGGREGATION_RULES",
    "CLASS_WEIGHTS",
    "MURMUR_CLASSES",
    "OUTCOME_CLASSES",
    "MacroAUROC",
    "MurmurWeightedAccuracy",
    "OutcomeCost",
    "OutcomeWeightedAccuracy",
    "PatientChallengeMetrics",
    "PatientPredictions",
    "PerClassRecall",
    "UnweightedAverageRecall",
    "aggregate_patients",
    "challenge_cost",
    "patient_scores",
    "weighted_accuracy",
]
