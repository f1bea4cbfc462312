"""modules.shared: cmd_opts, opts, state, sd_model, OptionInfo (WebUI 1.10 names)."""
import argparse
import os

from modules import options, paths, shared_state

OptionInfo = options.OptionInfo

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", type=str, default=paths.data_path)
parser.add_argument("--models-dir", type=str, default=None)
parser.add_argument("--ckpt", type=str, default=None)
parser.add_argument("--ckpt-dir", type=str, default=None)
parser.add_argument("--lora-dir", type=str, default=os.path.join(paths.models_path, "Lora"))
parser.add_argument("--embeddings-dir", type=str, default=os.path.join(paths.data_path, "embeddings"))
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--skip-install", action="store_true")
parser.add_argument("--no-download-sd-model", action="store_true")
parser.add_argument("--api", action="store_true")

cmd_opts = parser.parse_args([])

sd_model_file = os.path.join(paths.script_path, 'model.ckpt')
default_sd_model_file = sd_model_file

opts = options.Options({
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
}, restricted_opts=set())

state = shared_state.State()

sd_model = None  # set by sd_models.load_model / the tests


def refresh_checkpoints():
    import modules.sd_models
    modules.sd_models.list_models()
