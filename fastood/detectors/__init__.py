"""OOD detectors. Every score is higher for inputs that look more out-of-distribution.

``det = Energy(model)``; ``det.fit(train_loader)`` where the method needs ID training data (Mahalanobis,
RelativeMahalanobis, ViM, DICE, GM, DRF, OpenMax, ReAct, KNN);
``det.score(x) -> [B]``; ``det.score_loader(loader) -> [N]`` (CPU); ``det.predict_class(x)`` -> the classifier's
classes, used by :func:`fastood.evaluation.evaluate` for ID accuracy.
"""
from .ash import ASH
from .base import Detector, eval_mode
from .dice import DICE
from .discrepancy import Discrepancy
from .extra_class import ExtraClass
from .gen import GEN
from .gram import GM
from .ice import ICELikelihood
from .knn import KNN
from .logit_scores import MSP, Energy, Entropy, LogitDetector, MaxLogit
from .mahalanobis import Mahalanobis
from .max_id_probability import MaxIDProbability
from .odin import ODIN
from .openmax import OpenMax
from .react import ReAct
from .relative_mahalanobis import RelativeMahalanobis
from .residual_flow import DRF
from .tuning import tune_detector, tuning_table
from .vim import ViM

#: Detector classes by lower-case name (for the command line).
DETECTORS = {"msp": MSP, "maxlogit": MaxLogit, "energy": Energy, "entropy": Entropy, "odin": ODIN,
             "mahalanobis": Mahalanobis, "discrepancy": Discrepancy, "extraclass": ExtraClass,
             "ice": ICELikelihood, "maxidprobability": MaxIDProbability, "vim": ViM, "ash": ASH, "gen": GEN,
             "dice": DICE, "relativemahalanobis": RelativeMahalanobis,
             "gm": GM, "drf": DRF, "openmax": OpenMax, "react": ReAct, "knn": KNN}

__all__ = ["Detector", "LogitDetector", "MSP", "MaxLogit", "Energy", "Entropy", "ODIN", "Mahalanobis",
           "Discrepancy", "ExtraClass", "MaxIDProbability", "ICELikelihood", "tune_detector", "tuning_table", "eval_mode",
           "ViM", "ASH", "GEN", "DICE", "RelativeMahalanobis", "GM", "DRF", "OpenMax", "ReAct", "KNN", "DETECTORS"]
