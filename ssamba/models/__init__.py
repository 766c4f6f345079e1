"""Encoder families. Importing this package registers every family with the registry."""
from . import ssamba  # noqa: F401  (registers ssamba_tiny/small/base)
from . import ssast  # noqa: F401  (registers ssast_tiny/small/base)
from .heads import POOLINGS, ClassificationHead, Classifier, ClassifierEnsemble, prediction_head
from .registry import build_encoder, encoder_from_config, encoder_record, list_models, register_model
from .ssamba import SSAMBAConfig, SSAMBAEncoder

__all__ = ["POOLINGS", "ClassificationHead", "Classifier", "ClassifierEnsemble", "build_encoder", "encoder_from_config",
           "encoder_record", "list_models", "prediction_head", "register_model", "SSAMBAConfig", "SSAMBAEncoder"]
