"""modules_forge.main_entry (Forge dfdcbab6): Forge's checkpoint picker at the top of the page
and the calls behind it. The dropdown (class `model_selection`) calls checkpoint_change, which
does nothing when the picked name matches the option; otherwise it sets the option and
refresh_model_loading_parameters(), which is what makes the next generation load the model
(sd_models.forge_model_reload). The refresh button `#forge_refresh_checkpoint` re-reads the
list. Stand-in: no VAE / text-encoder modules, no low-bit dtypes, no settings file."""
import gradio as gr

from modules import processing, sd_models, shared, shared_items, ui_common

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


def refresh_models():
    shared_items.refresh_checkpoints()
    ckpt_list = shared_items.list_checkpoint_tiles(False)
    module_list.clear()
    return ckpt_list, module_list.keys()


def refresh_model_loading_parameters():
    from modules.sd_models import select_checkpoint, model_data
    checkpoint_info = select_checkpoint()
    model_data.forge_loading_parameters = dict(checkpoint_info=checkpoint_info,
                                               additional_modules=[], unet_storage_dtype=None)
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
