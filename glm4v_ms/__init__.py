"""glm4v_ms: GLM-4.1V (GLM-4.1V-9B-Thinking), GLM-4.6V-Flash and GLM-4.5V / GLM-4.6V (MoE) in MindSpore, numerically equal to the PyTorch reference.

The public API only. The package is layered along the data flow, imports going down only:
apps/ (pipeline, batch, convert) -> runtime/ (engine, generation) -> model/ (network, weights) -> processing/ (inputs).
"""

from ._version import __version__
from .model.config import Glm4vConfig, MoeTextConfig, TextConfig, VisionConfig
from .model.generation_config import GenerationConfig
from .model.glm4v import Glm4vForConditionalGeneration, Glm4vOutput
from .model.glm4v_moe import Glm4vMoeForConditionalGeneration
from .model.loading import load_model, load_tp_model, model_class
from .model.ops import set_device
from .model.rope import get_rope_index
from .model.weights import CheckpointError
from .processing.processor import Glm4vProcessor
from .runtime.generation import generate, stream_generate

__all__ = ["Glm4vConfig", "TextConfig", "MoeTextConfig", "VisionConfig", "GenerationConfig",
           "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "Glm4vOutput", "load_model",
           "load_tp_model", "model_class", "set_device", "get_rope_index", "CheckpointError", "Glm4vProcessor",
           "generate", "stream_generate", "__version__"]
