"""modules.sd_models: the checkpoint list and the model's moves, as in WebUI 1.10.

list_models() rescans models/Stable-diffusion (and --ckpt-dir); a file written since the last
scan is selectable only after it. CheckpointInfo's title is its name until a hash is computed
(the hash is lazy in the WebUI too). The loaded "model" is a StubModel whose device the tests
read; send_model_to_cpu/send_model_to_device move it and log the move.
"""
import os
import re
import sys

from modules import paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}
calls = []  # stand-in only: ("list_models",), ("send_model_to_cpu",), ("reload", title), ...


class StubModel:
    """What shared.sd_model is, minus the network: a device and the checkpoint it came from."""

    def __init__(self, checkpoint_info, device="cuda"):
        self.sd_checkpoint_info = checkpoint_info
        self.sd_model_checkpoint = checkpoint_info.filename if checkpoint_info else None
        self.device = device
        self.lowvram = False

    def to(self, device):
        self.device = str(device)
        return self


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, '')
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, '')
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.title, name, self.name_for_extra]

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def _scan(folder):
    found = []
    if folder and os.path.isdir(folder):
        for root, _, files in os.walk(folder, followlinks=True):
            for f in sorted(files):
                low = f.lower()
                if low.endswith((".vae.ckpt", ".vae.safetensors")):
                    continue
                if low.endswith((".ckpt", ".safetensors")):
                    found.append(os.path.join(root, f))
    return found


def list_models():
    from modules import call_queue  # stand-in only: was the GPU queue held while re-reading?
    calls.append(("list_models", call_queue.queue_lock.locked()))
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    cmd_ckpt = shared.cmd_opts.ckpt
    model_list = _scan(model_path) + _scan(shared.cmd_opts.ckpt_dir)
    if cmd_ckpt is not None and os.path.exists(cmd_ckpt):
        checkpoint_info = CheckpointInfo(cmd_ckpt)
        checkpoint_info.register()
        shared.opts.data['sd_model_checkpoint'] = checkpoint_info.title
    for filename in model_list:
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string, None)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title],
                   key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found.")
    checkpoint_info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {checkpoint_info.title}",
              file=sys.stderr)
    return checkpoint_info


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    checkpoint_info = checkpoint_info or select_checkpoint()
    calls.append(("load_model", checkpoint_info.title))
    shared.sd_model = StubModel(checkpoint_info)
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    return shared.sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    calls.append(("reload_model_weights", checkpoint_info.title))
    sd_model = sd_model or shared.sd_model
    if sd_model is None:
        return load_model(checkpoint_info)
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.sd_model_checkpoint = checkpoint_info.filename
    shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    return sd_model


def unload_model_weights(sd_model=None, info=None):
    calls.append(("unload_model_weights",))
    model = sd_model or shared.sd_model
    if model is not None:
        model.to("cpu")
    return sd_model


def send_model_to_cpu(m):
    calls.append(("send_model_to_cpu",))
    if m is not None:
        m.to("cpu")


def send_model_to_device(m):
    calls.append(("send_model_to_device",))
    m.to("cuda")


def send_model_to_trash(m):
    calls.append(("send_model_to_trash",))
    m.to("meta")
