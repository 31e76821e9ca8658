"""Models: a registry of torchvision backbones with one-logit heads, their construction and weights,
Grad-CAM layers, checkpoints, the fold ensemble of a CV run and SynFlow pruning."""

from xrai.models.checkpoint import CheckpointError, atomic_save, load_checkpoint
from xrai.models.ensemble import FoldEnsemble
from xrai.models.factory import (
    DEFAULT_MODEL,
    MODELS,
    ModelSpec,
    PretrainedWeightsError,
    XraiClassifier,
    create_model,
    gradcam_layer,
    gradcam_layers,
    list_models,
    load_model,
    register_model,
)
from xrai.models.pruning import (
    SynFlowReport,
    count_nonzero,
    prunable_layers,
    prune_synflow,
)

__all__ = ["DEFAULT_MODEL", "MODELS", "CheckpointError", "FoldEnsemble", "ModelSpec", "PretrainedWeightsError",
           "SynFlowReport", "XraiClassifier", "atomic_save", "count_nonzero", "create_model", "gradcam_layer",
           "gradcam_layers", "list_models", "load_checkpoint", "load_model", "prunable_layers", "prune_synflow",
           "register_model"]
