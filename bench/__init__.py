"""Speed and memory benchmark of one DreamBooth training step: `python -m bench`.

Times, in one process and alternating, (a) the reference: the step of diffusers'
examples/dreambooth/train_dreambooth.py at its defaults (SDXL: train_dreambooth_lora_sdxl.py),
re-created from the diffusers public API; (b) our Trainer's step at the same settings; (c) our
Trainer's step at our best settings. `--smoke` (automatic without CUDA) runs the tiny models;
otherwise the real SD1.5 and SDXL architectures, randomly initialised (random weights cost
exactly what real ones cost), at 512 and 1024 px.
"""
