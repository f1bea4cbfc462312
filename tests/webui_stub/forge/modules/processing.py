"""modules.processing (Forge dfdcbab6): the part of a generation that picks the model.
Every txt2img starts with manage_model_and_prompt_cache: forge_model_reload() loads what
main_entry's loading parameters name, if it is not what is loaded. process_images() here is
only that step plus the model's move onto the GPU that sampling makes; it returns the model the
generation used (the stand-in's "Model:" of the infotext)."""
from backend import memory_management
from modules.sd_models import forge_model_reload

need_global_unload = False


def manage_model_and_prompt_cache(p):
    global need_global_unload
    p.sd_model, just_reloaded = forge_model_reload()
    if need_global_unload and not just_reloaded:
        memory_management.unload_all_models()
    need_global_unload = False


class StableDiffusionProcessingTxt2Img:
    sd_model = None


def process_images(p=None):
    p = p or StableDiffusionProcessingTxt2Img()
    manage_model_and_prompt_cache(p)
    memory_management.load_models_gpu([p.sd_model])  # what sampling does first
    return p.sd_model
