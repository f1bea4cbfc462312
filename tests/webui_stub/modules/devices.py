"""modules.devices: the WebUI's device and torch_gc (no torch in the stand-in)."""
device = "cuda"
cpu = "cpu"
gc_calls = []


def torch_gc():
    gc_calls.append(1)
