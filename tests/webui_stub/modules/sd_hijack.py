"""modules.sd_hijack: `model_hijack.embedding_db`, the textual-inversion embedding database
(WebUI 1.10.1: EmbeddingDatabase with its dirs, `word_embeddings` keyed by file stem, and
`load_textual_inversion_embeddings(force_reload=False)`, which rescans only when a folder's
mtime grew unless forced). The stand-in records the calls and lists the file stems."""
import os

from modules import shared


class EmbeddingDatabase:
    def __init__(self):
        self.word_embeddings = {}
        self.reloads = []  # force_reload of each call

    def load_textual_inversion_embeddings(self, force_reload=False):
        self.reloads.append(force_reload)
        self.word_embeddings.clear()
        folder = shared.cmd_opts.embeddings_dir
        for root, _, files in os.walk(folder, followlinks=True):
            for fn in files:
                stem, ext = os.path.splitext(fn)
                if ext.upper() in (".PT", ".BIN", ".SAFETENSORS") and \
                        os.stat(os.path.join(root, fn)).st_size > 0:
                    self.word_embeddings[stem] = os.path.join(root, fn)


class StableDiffusionModelHijack:
    def __init__(self):
        self.embedding_db = EmbeddingDatabase()


model_hijack = StableDiffusionModelHijack()
