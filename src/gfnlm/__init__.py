"""gfnlm: GFlowNet fine-tuning of language models (Hu et al., ICLR 2024).

``from gfnlm import GFNConfig, GFNTrainer``; the engine's parts live in
:mod:`gfnlm.sampling`, :mod:`gfnlm.scoring`, :mod:`gfnlm.losses`, :mod:`gfnlm.rewards`,
:mod:`gfnlm.replay`.
"""

__version__ = "0.1.0"

from .config import GFNConfig  # noqa: E402
from .errors import ConfigError, DataError, GFNLMError, ModelLoadError, RewardError  # noqa: E402


def __getattr__(name):  # the trainer pulls in accelerate/transformers: import it lazily
    if name == "GFNTrainer":
        from .trainer import GFNTrainer

        return GFNTrainer
    raise AttributeError(name)


__all__ = ["GFNConfig", "GFNTrainer", "GFNLMError", "ConfigError", "DataError", "ModelLoadError", "RewardError"]
