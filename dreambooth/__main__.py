import sys

from .host.cli import main
from .ui.standalone import run as serve_ui

sys.exit(main(serve=serve_ui))
