"""DreamBooth fine-tuning of Stable Diffusion: a headless core the WebUI tab, the CLI and Python
share.

    from dreambooth import TrainingConfig, Concept, train
    result = train(TrainingConfig(source_checkpoint="sd15.safetensors",
                                  concepts=(Concept("dog/", "photo of sks dog"),)))

Importing this package loads nothing: the names below load on first use (the standard library
only; torch, diffusers and transformers load when training starts). So `python -m dreambooth
train` takes its signals before any import of ours (dreambooth.host.signals).
"""
__version__ = "0.1.0"
__all__ = ["TrainingConfig", "Concept", "Problem", "train", "create_model", "CancelToken",
           "DreamboothError", "ConfigError", "CheckpointError", "DataError", "TrainingError"]
_FROM = {"CancelToken": ".config.events", **{name: ".config" for name in __all__[6:]},
         **{name: ".config" for name in ("TrainingConfig", "Concept", "Problem")}}


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module 'dreambooth' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(_FROM[name], __name__), name)
    globals()[name] = value
    return value


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
