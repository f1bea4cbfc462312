"""modules_forge.main_entry (Forge dfdcbab6): Forge's checkpoint picker at the top of the page
and the calls behind it. The dropdown (class `model_selection`) calls checkpoint_change, which
does nothing when the picked name matches the option; otherwise it sets the option and
refresh_model_loading_parameters(), which is what makes the next generation load the model
(sd_models.forge_model_reload). The refresh button `#forge_refresh_checkpoint` re-reads the
list, and with it the "VAE / Text Encoder" modules: `module_list` (file name -> path of the
files under models/VAE, models/text_encoder, --vae-dir and --text-encoder-dir), the picked ones
kept as paths in shared.opts.forge_additional_modules by modules_change. Stand-in: no low-bit
dtypes, no settings file, no memory sliders."""
import os

import gradio as gr

from modules import paths, processing, sd_models, shared, shared_items, ui_common

ui_checkpoint = None
module_list = {}
saves = []  # stand-in only: each opts.save Forge would have made


def make_checkpoint_manager_ui():
    global ui_checkpoint
    if shared.opts.sd_model_checkpoint in [None, 'None', 'none', '']:
        if len(sd_models.checkpoints_list) == 0:
            sd_models.list_models()
        if len(sd_models.checkpoints_list) > 0:
            shared.opts.set('sd_model_checkpoint', next(iter(sd_models.checkpoints_list.values())).name)
    ckpt_list, _ = refresh_models()
    ui_checkpoint = gr.Dropdown(value=lambda: shared.opts.sd_model_checkpoint, label="Checkpoint",
                                elem_classes=['model_selection'], choices=ckpt_list)

    def gr_refresh_models():
        a, _ = refresh_models()
        return gr.update(choices=a)

    refresh_button = ui_common.ToolButton(value=ui_common.refresh_symbol, elem_id="forge_refresh_checkpoint")
    refresh_button.click(fn=gr_refresh_models, inputs=[], outputs=[ui_checkpoint], queue=False)
    ui_checkpoint.change(checkpoint_change, inputs=[ui_checkpoint])


def find_files_with_extensions(base_path, extensions):
    found_files = {}
    for root, _, files in os.walk(base_path):
        for file in files:
            if any(file.endswith(ext) for ext in extensions):
                found_files[file] = os.path.join(root, file)
    return found_files


def refresh_models():
    shared_items.refresh_checkpoints()
    ckpt_list = shared_items.list_checkpoint_tiles(False)
    file_extensions = ['ckpt', 'pt', 'bin', 'safetensors', 'gguf']
    module_list.clear()
    module_paths = [os.path.abspath(os.path.join(paths.models_path, "VAE")),
                    os.path.abspath(os.path.join(paths.models_path, "text_encoder"))]
    if isinstance(shared.cmd_opts.vae_dir, str):
        module_paths.append(os.path.abspath(shared.cmd_opts.vae_dir))
    if isinstance(shared.cmd_opts.text_encoder_dir, str):
        module_paths.append(os.path.abspath(shared.cmd_opts.text_encoder_dir))
    for vae_path in module_paths:
        module_list.update(find_files_with_extensions(vae_path, file_extensions))
    return ckpt_list, module_list.keys()


def modules_change(module_values: list, save=True, refresh=True) -> bool:
    """What the top bar's "VAE / Text Encoder" dropdown calls with the names picked: the
    option holds their paths (module_list's), as the loading parameters use them."""
    modules = []
    for v in module_values:
        module_name = os.path.basename(v)
        if module_name in module_list:
            modules.append(module_list[module_name])
    if sorted(modules) == sorted(shared.opts.data.get('forge_additional_modules', [])):
        return False
    shared.opts.set('forge_additional_modules', modules)
    if save:
        saves.append(modules)
    if refresh:
        refresh_model_loading_parameters()
    return True


def refresh_model_loading_parameters():
    from modules.sd_models import select_checkpoint, model_data
    checkpoint_info = select_checkpoint()
    model_data.forge_loading_parameters = dict(
        checkpoint_info=checkpoint_info,
        additional_modules=shared.opts.forge_additional_modules, unet_storage_dtype=None)
    processing.need_global_unload = True


def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    """What the dropdown calls with the name picked (any alias): True when it named another
    checkpoint than the option, which it then sets, with the loading parameters."""
    new_ckpt_info = sd_models.get_closet_checkpoint_match(ckpt_name)
    current_ckpt_info = sd_models.get_closet_checkpoint_match(shared.opts.data.get('sd_model_checkpoint', ''))
    if new_ckpt_info == current_ckpt_info:
        return False
    shared.opts.set('sd_model_checkpoint', ckpt_name)
    if save:
        saves.append(ckpt_name)
    if refresh:
        refresh_model_loading_parameters()
    return True
