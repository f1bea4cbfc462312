"""modules.sd_models as Forge (dfdcbab6) has it. The checkpoint list is AUTOMATIC1111's
(CheckpointInfo, list_models, checkpoints_list, aliases: the A1111 stand-in's, shared), but:
- reload_model_weights, load_model, send_model_to_cpu/device/trash are empty (the stand-in
  records the call and does nothing else, as Forge does nothing);
- unload_model_weights asks the memory manager to unload everything;
- a model is loaded only by forge_model_reload(), at the start of a generation, from
  model_data.forge_loading_parameters (set by modules_forge.main_entry), when they differ from
  what was loaded (model_data.forge_hash). `loads` lists the titles it loaded: the stand-in's
  "model loaded" record, which changes only through that path;
- checkpoint_tiles() lists names (Forge's dropdown choices), not titles; select_checkpoint()
  returns None when there is no checkpoint.
"""
import importlib.util
import os
import sys

from modules import shared, shared_items  # noqa: F401  (shared_items: shared.sd_model is model_data's)

_A1111 = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                      "modules", "sd_models.py")
_spec = importlib.util.spec_from_file_location("modules.sd_models_a1111", _A1111)
_a1111 = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _a1111
_spec.loader.exec_module(_a1111)

model_dir = _a1111.model_dir
model_path = _a1111.model_path
checkpoints_list = _a1111.checkpoints_list
checkpoint_aliases = _a1111.checkpoint_aliases
calls = _a1111.calls
CheckpointInfo = _a1111.CheckpointInfo
StubModel = _a1111.StubModel
list_models = _a1111.list_models
get_closet_checkpoint_match = _a1111.get_closet_checkpoint_match
loads = []  # stand-in only: the title of each model forge_model_reload loaded


class EmbeddingDatabase:
    """backend.text_processing.textual_inversion.EmbeddingDatabase: one per text encoder of a
    loaded model, filled from its folders at load; load_textual_inversion_embeddings() (no
    arguments in Forge) reads them again. Stand-in: the stems of the non-empty files."""

    def __init__(self):
        self.embedding_dirs = {}
        self.word_embeddings = {}

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = path

    def load_textual_inversion_embeddings(self):
        self.word_embeddings.clear()
        for folder in self.embedding_dirs:
            for root, _, files in os.walk(folder, followlinks=True):
                for fn in files:
                    stem, ext = os.path.splitext(fn)
                    if ext.upper() in (".PT", ".BIN", ".SAFETENSORS") and \
                            os.stat(os.path.join(root, fn)).st_size > 0:
                        self.word_embeddings[stem] = os.path.join(root, fn)


class TextProcessingEngine:
    def __init__(self, embedding_dir):
        self.embeddings = EmbeddingDatabase()
        self.embeddings.add_embedding_dir(embedding_dir)
        self.embeddings.load_textual_inversion_embeddings()


class ForgeModel(StubModel):
    """What forge_loader returns for an SD1.x checkpoint, minus the network: the weights start on
    the CPU; `text_processing_engine` reads the --embeddings-dir at load."""

    def __init__(self, checkpoint_info):
        super().__init__(checkpoint_info, device="cpu")
        self.filename = checkpoint_info.filename
        self.text_processing_engine = TextProcessingEngine(shared.cmd_opts.embeddings_dir)


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.name for x in checkpoints_list.values()]


def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        return None
    return next(iter(checkpoints_list.values()))


class FakeInitialModel:
    """What shared.sd_model is before the first generation loads a model."""

    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ''

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v


model_data = SdModelData()


def send_model_to_cpu(m):
    calls.append(("send_model_to_cpu",))


def send_model_to_device(m):
    calls.append(("send_model_to_device",))


def send_model_to_trash(m):
    calls.append(("send_model_to_trash",))


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    calls.append(("load_model",))


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    calls.append(("reload_model_weights", getattr(info, "title", None)))


def unload_model_weights(sd_model=None, info=None):
    from backend import memory_management
    calls.append(("unload_model_weights",))
    memory_management.unload_all_models()


def forge_model_reload():
    from backend import memory_management
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    if model_data.sd_model:
        model_data.sd_model = None
        memory_management.unload_all_models()
    checkpoint_info = model_data.forge_loading_parameters['checkpoint_info']
    if checkpoint_info is None:
        raise ValueError("no checkpoint to load")
    sd_model = ForgeModel(checkpoint_info)
    loads.append(checkpoint_info.title)
    model_data.set_sd_model(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True
