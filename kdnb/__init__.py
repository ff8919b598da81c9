"""kdnb: knowledge distillation for semantic segmentation, as a library and a workbook.

The data flows config -> dataset -> model -> losses -> step -> loop -> metrics -> viz; this
module re-exports the public API of each layer.
"""
__version__ = "0.1.0"

from .config import RECIPES, TrainConfig, get_recipe  # noqa: E402
from .data import SynthScenes, available_datasets, build_dataset, data_root  # noqa: E402
from .features import ChannelAdapter, FeatureRecorder, forward_with_head, match_size  # noqa: E402
from .metrics import SegMetric, evaluate  # noqa: E402
from .models import PRESETS, SegModel, available_presets, build_model  # noqa: E402
from .losses import build_losses  # noqa: E402
from .distill import DistillLosses, TeacherOutputs, build_distill_losses, distill_step  # noqa: E402
from .train import Trainer  # noqa: E402
from .build import build_trainer  # noqa: E402

__all__ = [
    "__version__", "ChannelAdapter", "DistillLosses", "FeatureRecorder", "PRESETS", "RECIPES",
    "SegMetric", "SegModel", "SynthScenes", "TeacherOutputs", "TrainConfig", "Trainer",
    "available_datasets", "available_presets", "build_dataset", "build_distill_losses",
    "build_losses", "build_model", "build_trainer", "data_root", "distill_step", "evaluate",
    "forward_with_head", "get_recipe", "match_size",
]
