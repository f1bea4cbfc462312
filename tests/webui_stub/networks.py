"""extensions-builtin/Lora/networks.py (WebUI 1.10): the Lora list the extra-networks page shows.
list_available_networks() rescans --lora-dir; the stand-in records the call and the files."""
import os

from modules import shared

available_networks = {}
calls = []


def list_available_networks():
    calls.append(("list_available_networks",))
    available_networks.clear()
    folder = shared.cmd_opts.lora_dir
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".safetensors"):
                available_networks[os.path.splitext(f)[0]] = os.path.join(root, f)
