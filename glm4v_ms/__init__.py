"""glm4v_ms: GLM-4.1V (GLM-4.1V-9B-Thinking) in MindSpore, numerically equal to the PyTorch reference."""

from .config import Glm4vConfig, TextConfig, VisionConfig
from .model import Glm4vForConditionalGeneration, Glm4vOutput
from .ops import set_device
from .rope import get_rope_index
from .weights import CheckpointError

__all__ = ["Glm4vConfig", "TextConfig", "VisionConfig", "Glm4vForConditionalGeneration", "Glm4vOutput",
           "set_device", "get_rope_index", "CheckpointError"]
__version__ = "0.1.0"
