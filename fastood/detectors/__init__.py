"""OOD detectors. Every score is higher for inputs that look more out-of-distribution.

``det = Energy(model)``; ``det.fit(train_loader)`` where the method needs ID training data (Mahalanobis);
``det.score(x) -> [B]``; ``det.score_loader(loader) -> [N]`` (CPU); ``det.predict_class(x)`` -> the classifier's
classes, used by :func:`fastood.evaluation.evaluate` for ID accuracy.
"""
from .base import Detector, eval_mode
from .discrepancy import Discrepancy
from .extra_class import ExtraClass
from .features import LayerFeatures
from .gram import GM
from .ice import ICELikelihood
from .knn import KNN
from .logit_scores import MSP, Energy, Entropy, LogitDetector, MaxLogit
from .mahalanobis import Mahalanobis
from .max_id_probability import MaxIDProbability
from .odin import ODIN
from .openmax import OpenMax
from .react import ReAct
from .residual_flow import DRF
from .tuning import tune_detector, tuning_table

#: Detector classes by lower-case name (for the command line).
DETECTORS = {"msp": MSP, "maxlogit": MaxLogit, "energy": Energy, "entropy": Entropy, "odin": ODIN,
             "mahalanobis": Mahalanobis, "discrepancy": Discrepancy, "extraclass": ExtraClass,
             "ice": ICELikelihood, "maxidprobability": MaxIDProbability,
             "gm": GM, "drf": DRF, "openmax": OpenMax, "react": ReAct, "knn": KNN}

__all__ = ["Detector", "LogitDetector", "MSP", "MaxLogit", "Energy", "Entropy", "ODIN", "Mahalanobis",
           "Discrepancy", "ExtraClass", "MaxIDProbability", "ICELikelihood", "tune_detector", "tuning_table", "eval_mode",
           "GM", "DRF", "OpenMax", "ReAct", "KNN", "LayerFeatures", "DETECTORS"]
