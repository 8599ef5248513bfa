"""Which model class a folder holds, and the loading entry points that pick it from ``config.json``.

``model_class(folder)``: Glm4vMoeForConditionalGeneration for ``model_type`` ``glm4v_moe`` (GLM-4.5V / GLM-4.6V),
Glm4vForConditionalGeneration otherwise (GLM-4.1V, GLM-4.6V-Flash). ``load_model`` and ``load_tp_model`` are what
the applications (generate.py, batch jobs, the server, the tools) call.
"""

from __future__ import annotations

import os

import mindspore as ms

from .config import Glm4vConfig
from .glm4v import Glm4vForConditionalGeneration
from .glm4v_moe import Glm4vMoeForConditionalGeneration
from .parallel import check_divisible, check_divisible_moe, init_tensor_parallel


def model_class(config_or_folder):
    """The model class for a Glm4vConfig or a model folder."""
    cfg = config_or_folder
    if not isinstance(cfg, Glm4vConfig):
        cfg = Glm4vConfig.from_pretrained(os.fspath(config_or_folder))
    return Glm4vMoeForConditionalGeneration if cfg.is_moe else Glm4vForConditionalGeneration


def load_model(folder: str, dtype=ms.float32, quantized_weights: str = "auto", tensor_parallel=None, progress=None):
    """``<class>.from_pretrained(folder, ...)`` with the class ``config.json`` names."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    return model_class(folder).from_pretrained(folder, dtype=dtype, quantized_weights=quantized_weights,
                                               tensor_parallel=tensor_parallel, progress=progress)


def check_parallel(config: Glm4vConfig, tp: int, ep: int = 1) -> None:
    """ValueError naming the config field that ``tp`` / ``ep`` does not divide (before any process group is
    joined); expert parallelism only exists for MoE models."""
    if config.is_moe:
        check_divisible_moe(config.text, tp, ep)
    elif ep != 1:
        raise ValueError(f"expert parallelism (ep={ep}) needs a mixture-of-experts model (GLM-4.5V / GLM-4.6V); "
                         f"this folder holds {config.model_type!r}, a dense model: use tensor parallelism")
    else:
        check_divisible(config.text, tp)


def load_tp_model(folder: str, tp: int, dtype=None, quantized_weights: str = "auto", ep: int = 1):
    """The single entry point for model parallelism under msrun: set up the group (``init_tensor_parallel(tp, ep)``)
    and load this rank's model from ``folder``. Returns ``(model, ctx)``; with tp == ep == 1 outside msrun it is the
    ordinary model. ``ep`` (MoE models only) splits the routed experts. Raises ValueError naming the config field
    when tp / ep does not divide it."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    check_parallel(Glm4vConfig.from_pretrained(folder), tp, ep)
    ctx = init_tensor_parallel(tp, ep)
    model = load_model(folder, dtype=ms.float32 if dtype is None else dtype, quantized_weights=quantized_weights,
                       tensor_parallel=ctx if ctx.enabled else None)
    return model, ctx
