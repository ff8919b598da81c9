"""kdnb: knowledge distillation for semantic segmentation, as a library and a workbook.

The data flows config -> dataset -> model (+ recorder) -> losses -> step -> metrics -> viz;
this module re-exports the public API of each layer.
"""
__version__ = "0.1.0"

from .config import RECIPES, TrainConfig, get_recipe  # noqa: E402
from .data import SynthScenes, available_datasets, build_dataset, data_root  # noqa: E402
from .features import ChannelAdapter, FeatureRecorder, forward_with_head, match_size  # noqa: E402
from .metrics import SegMetric  # noqa: E402
from .models import PRESETS, SegModel, available_presets, build_model  # noqa: E402

__all__ = [
    "__version__", "ChannelAdapter", "FeatureRecorder", "PRESETS", "RECIPES", "SegMetric",
    "SegModel", "SynthScenes", "TrainConfig", "available_datasets", "available_presets",
    "build_dataset", "build_model", "data_root", "forward_with_head", "get_recipe",
    "match_size",
]
