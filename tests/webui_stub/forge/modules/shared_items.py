"""modules.shared_items (Forge dfdcbab6): `shared.sd_model` is a property over
sd_models.model_data (Forge swaps the class of the `modules.shared` module object), and the
refresh of the checkpoint list Forge's own refresh button calls. Also Forge's additions to
`shared` that the glue reads, which Forge makes in its own cmd_args and shared_options (here,
where Forge's modules first load): --vae-dir and --text-encoder-dir, and the hidden option
forge_additional_modules (the VAE / text encoder paths picked in the top bar)."""
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


def _forge_additions(shared_module) -> None:
    """modules/cmd_args.py's --vae-dir and --text-encoder-dir (default None), and
    modules_forge/shared_options.py's forge_additional_modules (OptionInfo([]))."""
    parser = shared_module.parser
    known = {a for action in parser._actions for a in action.option_strings}
    for flag in ("--vae-dir", "--text-encoder-dir"):
        if flag not in known:
            parser.add_argument(flag, type=str, default=None)
    shared_module.cmd_opts = parser.parse_args([])
    opts = shared_module.opts
    opts.data_labels["forge_additional_modules"] = shared_module.OptionInfo([])
    opts.data.setdefault("forge_additional_modules", [])


_forge_additions(sys.modules["modules.shared"])
