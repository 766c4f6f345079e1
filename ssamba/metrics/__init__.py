"""Metrics: the PhysioNet Challenge 2022 scores, per item and aggregated per patient, and scores for any label set."""

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
from ssamba.metrics.labelset import (
    PatientLabelSetMetrics,
    aggregate_label_set,
    collapse_to_murmur,
    collapsed_challenge_scores,
    is_challenge_label_set,
    label_set_scores,
    murmur_groups,
    patient_metrics,
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
    "PatientLabelSetMetrics",
    "PatientPredictions",
    "PerClassRecall",
    "UnweightedAverageRecall",
    "aggregate_label_set",
    "aggregate_patients",
    "challenge_cost",
    "collapse_to_murmur",
    "collapsed_challenge_scores",
    "is_challenge_label_set",
    "label_set_scores",
    "murmur_groups",
    "patient_metrics",
    "patient_scores",
    "weighted_accuracy",
]
