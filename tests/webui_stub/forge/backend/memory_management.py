"""backend.memory_management (Forge dfdcbab6): Forge's own GPU memory manager. A model is on the
GPU while it is in current_loaded_models; unload_all_models() moves every one off (to the CPU)
and Forge moves a model back by itself the next time a generation needs it (load_models_gpu).
The stand-in's models are sd_models.StubModel objects; `calls` records what was asked."""

current_loaded_models = []
calls = []  # stand-in only: ("unload_all_models",), ("load_models_gpu", n)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    calls.append(("load_models_gpu", len(models)))
    for m in models:
        if m not in current_loaded_models:
            current_loaded_models.append(m)
        m.to("cuda")


def unload_all_models():
    calls.append(("unload_all_models",))
    while current_loaded_models:
        current_loaded_models.pop().to("cpu")


def soft_empty_cache(force=False):
    pass
