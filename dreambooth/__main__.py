import sys

if sys.argv[1:2] in (["train"], ["demo"]):  # first: a signal from here on is kept, not fatal
    from .host.signals import CHILD
    CHILD.install(owner=True)

from .host.cli import main  # noqa: E402
from .ui.standalone import run as serve_ui  # noqa: E402

sys.exit(main(serve=serve_ui))
