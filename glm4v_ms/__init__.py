"""glm4v_ms: GLM-4.1V (GLM-4.1V-9B-Thinking) in MindSpore, numerically equal to the PyTorch reference.

The public API only. The package is layered along the data flow, imports going down only:
apps/ (pipeline, batch, convert) -> runtime/ (engine, generation) -> model/ (network, weights) -> processing/ (inputs).
"""

from ._version import __version__
from .model.config import Glm4vConfig, TextConfig, VisionConfig
from .model.generation_config import GenerationConfig
from .model.glm4v import Glm4vForConditionalGeneration, Glm4vOutput, load_tp_model
from .model.ops import set_device
from .model.rope import get_rope_index
from .model.weights import CheckpointError
from .processing.processor import Glm4vProcessor
from .runtime.generation import generate, stream_generate

__all__ = ["Glm4vConfig", "TextConfig", "VisionConfig", "GenerationConfig", "Glm4vForConditionalGeneration",
           "Glm4vOutput", "load_tp_model", "set_device", "get_rope_index", "CheckpointError", "Glm4vProcessor",
           "generate", "stream_generate", "__version__"]
