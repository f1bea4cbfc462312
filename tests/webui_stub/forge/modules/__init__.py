"""Forge's `modules` package (lllyasviel/stable-diffusion-webui-forge at dfdcbab6) over the
AUTOMATIC1111 stand-in: the files in this folder are Forge's where it differs (sd_models,
shared_items, processing); every other module is found in ../../modules, which Forge keeps as
AUTOMATIC1111 1.10 has it for what our glue uses (paths, shared, options, call_queue,
script_callbacks, ui_common...)."""
import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "modules"))
