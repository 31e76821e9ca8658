"""Models: a registry of torchvision backbones (``registry``), ``create_model`` with a one-logit head and
the Grad-CAM layer of each family (``factory``), ImageNet weights (``weights``), the one-logit arithmetic
(``logits``), the fold ensemble of a CV run (``ensemble``), SynFlow pruning (``pruning``) and checkpoint
files (``checkpoint``). Loading a trained run is ``xrai.runs.load``."""

from xrai.models.checkpoint import CheckpointError, atomic_save, load_checkpoint
from xrai.models.ensemble import FoldEnsemble
from xrai.models.factory import (
           DenseNetBackbone,
           XraiClassifier,
           create_model,
           gradcam_layer,
           gradcam_layers,
)
from xrai.models.logits import flip_tta_logits, mean_probability_logit, one_logit
from xrai.models.pruning import (
           SynFlowReport,
           count_nonzero,
           parameter_count,
           prunable_layers,
           prune_synflow,
)
from xrai.models.registry import (
           DEFAULT_MODEL,
           MODELS,
           ModelSpec,
           list_models,
           register_model,
)
from xrai.models.weights import PretrainedWeightsError

__all__ = ["DEFAULT_MODEL", "MODELS", "CheckpointError", "DenseNetBackbone", "FoldEnsemble", "ModelSpec",
           "PretrainedWeightsError", "SynFlowReport", "XraiClassifier", "atomic_save", "count_nonzero", "create_model",
           "flip_tta_logits", "gradcam_layer", "gradcam_layers", "list_models", "load_checkpoint",
           "mean_probability_logit", "one_logit", "parameter_count", "prunable_layers", "prune_synflow", "register_model"]
