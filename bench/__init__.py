"""Speed and memory benchmark of one DreamBooth training step: `python -m bench`.

Times, in one process and alternating, (a) the reference: the step of diffusers'
examples/dreambooth/train_dreambooth.py at its defaults, re-created from the diffusers public
API; (b) our Trainer's step at the same settings; (c) our Trainer's step at our best settings.
`--smoke` (automatic without CUDA) runs the tiny model; otherwise the real SD1.5 architecture,
randomly initialised (random weights cost exactly what real ones cost), 512x512 images.
"""
