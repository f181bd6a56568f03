"""OOD detectors. Every score is higher for inputs that look more out-of-distribution."""
from .base import Detector, eval_mode
from .logit_scores import MSP, Discrepancy, Energy, Entropy, ExtraClass, ICELikelihood, MaxLogit
from .mahalanobis import Mahalanobis
from .odin import ODIN
from .tuning import tune_detector

DETECTORS = {"msp": MSP, "maxlogit": MaxLogit, "energy": Energy, "entropy": Entropy, "odin": ODIN,
             "mahalanobis": Mahalanobis, "discrepancy": Discrepancy, "extraclass": ExtraClass,
             "ice": ICELikelihood}

__all__ = ["Detector", "MSP", "MaxLogit", "Energy", "Entropy", "ODIN", "Mahalanobis", "Discrepancy", "ExtraClass",
           "ICELikelihood", "tune_detector", "eval_mode", "DETECTORS"]
