"""modules.shared_items (Forge dfdcbab6): `shared.sd_model` is a property over
sd_models.model_data (Forge swaps the class of the `modules.shared` module object), and the
refresh of the checkpoint list Forge's own refresh button calls."""
import sys

from modules import shared  # noqa: F401  (the module whose class is swapped below)


def list_checkpoint_tiles(use_short=False):
    import modules.sd_models
    return modules.sd_models.checkpoint_tiles(use_short)


def refresh_checkpoints():
    import modules.sd_models
    return modules.sd_models.list_models()


class Shared(sys.modules["modules.shared"].__class__):
    """shared.sd_model reads and writes sd_models.model_data's model."""

    sd_model_val = None

    @property
    def sd_model(self):
        import modules.sd_models
        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models
        modules.sd_models.model_data.set_sd_model(value)


sys.modules["modules.shared"].__class__ = Shared
