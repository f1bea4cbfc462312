"""modules.paths: where the WebUI keeps things (paths_internal in the real WebUI)."""
import os

script_path = os.environ.get("WEBUI_STUB_SCRIPT_DIR") or os.path.dirname(os.path.dirname(__file__))
data_path = os.environ.get("WEBUI_STUB_DATA_DIR") or script_path
models_path = os.environ.get("WEBUI_STUB_MODELS_DIR") or os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
