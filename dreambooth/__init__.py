"""DreamBooth fine-tuning of Stable Diffusion: a headless core the WebUI tab, the CLI and Python
share.

    from dreambooth import TrainingConfig, Concept, train
    result = train(TrainingConfig(source_checkpoint="sd15.safetensors",
                                  concepts=(Concept("dog/", "photo of sks dog"),)))

Importing this package loads only the standard library; torch, diffusers and transformers load
when training starts.
"""
from .config import CheckpointError, Concept, ConfigError, DataError, DreamboothError, Problem, \
    TrainingConfig, TrainingError
from .config.events import CancelToken

__version__ = "0.1.0"
__all__ = ["TrainingConfig", "Concept", "Problem", "train", "create_model", "CancelToken",
           "DreamboothError", "ConfigError", "CheckpointError", "DataError", "TrainingError"]


def train(config, on_event=None, cancel=None):
    """Run training (see dreambooth.training.trainer.train)."""
    from .training.trainer import train as _train
    return _train(config, on_event, cancel)


def create_model(config):
    """Convert the config's source checkpoint into the model's working folder; returns it."""
    from .config.folders import claim_model_dir
    from .model.workdir import load_model, save_working_dir, working_dir
    claim_model_dir(config.model_dir)
    comp, _ = load_model(config, lambda text: None)
    return save_working_dir(comp, working_dir(config))
