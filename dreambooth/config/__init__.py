"""The configuration stage: what a run is asked to do, and the words it reports in.

In: a JSON file, a dict, the tab's widget values or keyword arguments. Out: a validated, frozen
`TrainingConfig` (with its `Concept`s), every problem at once as `Problem`s, older files migrated
to the current schema; plus the event types a run reports through (`events`) and the error types
every layer raises (`errors`).

Standard library only: the WebUI process imports this package without torch. Nothing in it
imports another stage of `dreambooth`.
"""
from .errors import CheckpointError, ConfigError, DataError, DreamboothError, Problem, TrainingError
from .levers import ATTENTION, MEMORY_PRESETS
from .migrate import MIGRATIONS, SCHEMA_VERSION, migrate
from .schema import DETERMINISTIC, LR_SCHEDULERS, MIXED_PRECISION, MODEL_TYPES, OPTIMIZERS, \
    SAVE_PRECISION, Concept, TrainingConfig, field_help

__all__ = ["TrainingConfig", "Concept", "Problem", "field_help", "migrate", "MIGRATIONS",
           "SCHEMA_VERSION", "MODEL_TYPES", "OPTIMIZERS", "MIXED_PRECISION", "ATTENTION",
           "LR_SCHEDULERS", "SAVE_PRECISION", "MEMORY_PRESETS", "DETERMINISTIC", "DreamboothError", "ConfigError",
           "CheckpointError", "DataError", "TrainingError"]
