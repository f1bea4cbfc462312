"""Command-line flags of the Dreambooth extension, read later as shared.cmd_opts.dreambooth_*.

The WebUI calls preload(parser) before it parses its command line. Nothing else happens here.
"""


def preload(parser):
    parser.add_argument("--dreambooth-dir", type=str, default=None,
                        help="Dreambooth: folder for models' settings, working copies and "
                             "samples (default: <models dir>/dreambooth)")
    parser.add_argument("--dreambooth-data-dir", type=str, default=None,
                        help="Dreambooth: the only folder (besides the Dreambooth folder) whose "
                             "image folders the tab and the HTTP API may train on (default: "
                             "the Dreambooth folder)")
    parser.add_argument("--dreambooth-python", type=str, default=None,
                        help="Dreambooth: interpreter that runs training (default: the WebUI's)")
    parser.add_argument("--dreambooth-no-offload", action="store_true",
                        help="Dreambooth: keep the WebUI's model on the GPU while training")
