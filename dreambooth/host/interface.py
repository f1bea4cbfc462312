"""What a host (the WebUI, or the standalone app) tells the tab: where things live, how to tell it
about new files, how to free the GPU. Standard library only.

The tab, the HTTP API and the run manager talk to one `Host`; `StandaloneHost` serves
`python -m dreambooth ui`, and scripts/dreambooth_tab.py subclasses it for the WebUI.
"""
from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .parts import scan_parts

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the extension folder when cloned
LOG_PREFIX = "[dreambooth]"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint the host can load: `title` as its dropdown shows it, `filename` its path."""

    title: str
    filename: str


@dataclass(frozen=True)
class HostPaths:
    checkpoints_dir: Path  # where full checkpoints go (the WebUI's models/Stable-diffusion)
    lora_dir: Path  # where LoRA files go (the WebUI's models/Lora)
    work_dir: Path  # one folder per Dreambooth model: settings, working copy, samples
    lib_dir: Path  # extension-local packages only the training process puts on its path
    data_dir: Path | None = None  # image folders a remote caller may name (None: the work dir)
    # where embeddings go (the WebUI's --embeddings-dir; None: <work dir>/embeddings)
    embeddings_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", self.work_dir)
        if self.embeddings_dir is None:
            object.__setattr__(self, "embeddings_dir", self.work_dir / "embeddings")


class Host:
    """The standalone host: plain folders, no model of its own to move off the GPU."""

    name = "standalone"
    # True where the host's page shows LoRAs and embeddings as cards that it re-reads only when
    # its Refresh is pressed, with no call to refresh them from here (AUTOMATIC1111 1.10 and
    # Forge: the extra networks' HTML is built once per page and by that button)
    cards_need_refresh: bool = False
    # the model types whose outputs the host can load (None: all); AUTOMATIC1111 1.10 has no
    # Flux and no SD3.5, so its tab offers none of the flux-* / sd3.5-* types and says why
    model_types: tuple | None = None
    no_flux_note = "AUTOMATIC1111 1.10 has no Flux or SD3.5: train their LoRAs under Forge."
    # a T5 tokenizer the host ships (Forge's FLUX.1-dev's; SD3.5's T5 reads the same)
    t5_tokenizer_dir: str | None = None

    def __init__(self, paths: HostPaths, python: str = sys.executable,
                 api_auth: str = "") -> None:
        self.paths = paths
        self.python = python  # the interpreter the training child runs with
        self.api_auth = api_auth  # "user:password,user2:password2" (the WebUI's --api-auth)

    # -- checkpoints -------------------------------------------------------------------------
    def list_checkpoints(self) -> list[Checkpoint]:
        """Checkpoints the user can start from, as the host lists them."""
        return scan_checkpoints(self.paths.checkpoints_dir)

    def refresh_checkpoints(self) -> None:
        """Rescan so a file written since is selectable (the WebUI: sd_models.list_models())."""

    def refresh_loras(self) -> None:
        """Rescan the LoRA list (the WebUI's built-in Lora extra network)."""

    def refresh_embeddings(self) -> None:
        """Reload the textual-inversion embeddings (the WebUI's embedding database)."""

    def select_checkpoint(self, path: str) -> str:
        """Make `path` the model txt2img uses; return its title. Standalone: nothing to load."""
        raise NotImplementedError("There is no txt2img here: load the file in your WebUI.")

    @property
    def can_select_checkpoint(self) -> bool:
        return type(self).select_checkpoint is not Host.select_checkpoint

    # -- the separate files of Flux / SD3.5 (text encoders, autoencoder) -------------------------
    def part_files(self) -> dict[str, str] | None:
        """File name -> path of the text encoder and VAE files the host offers (Forge: its "VAE
        / Text Encoder" list); None where the host lists none (the tab then takes a path).
        Standalone: the files in the checkpoints folder and in VAE/ and text_encoder/ beside it
        (a WebUI's models folder when --checkpoints-dir is its Stable-diffusion folder)."""
        folder = self.paths.checkpoints_dir
        return scan_parts([folder.parent / "VAE", folder.parent / "text_encoder", folder])

    def refresh_part_files(self) -> None:
        """Re-read the list part_files() answers from (standalone: it is read at each call)."""

    def selected_parts(self) -> list[str]:
        """The part files the user picked for generating in the host's own UI (Forge's top bar:
        paths), the tab's first choice where several files suit a field."""
        return []

    # -- training ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def model_offloaded(self) -> Iterator[None]:
        """Free the GPU of the host's own model for the duration; restore it after."""
        yield

    def child_pythonpath(self) -> list[str]:
        """Folders the training child puts first on its path: our lib folder (when install.py
        filled it for the interpreter that trains), then our package."""
        paths = [str(self.paths.lib_dir)] if lib_fits(self.paths.lib_dir, self.python) else []
        return paths + [str(PACKAGE_ROOT)]

    def missing_dependencies(self) -> list[str]:
        """Packages training needs that are neither in the host nor in the lib folder."""
        return []

    def origin_allowed(self, origin: str) -> bool:
        """True for a web page's origin (another site's) that the host's owner allowed to call
        the HTTP API (the WebUI's --cors-allow-origins); the standalone host allows none."""
        return False

    def log(self, text: str) -> None:
        print(f"{LOG_PREFIX} {text}", file=sys.stderr)


LIB_MARKER = "dreambooth_lib.json"  # written by install.py: {"python": ..., "version": ...}


def lib_fits(lib_dir: Path, python: str) -> bool:
    """True when `lib_dir` holds packages for `python`: install.py filled it for that
    interpreter (or by hand, without a marker). Packages for another interpreter's versions
    would shadow its own and break it."""
    if not lib_dir.is_dir():
        return False
    try:
        marker = json.loads((lib_dir / LIB_MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    def bin_dir(exe: str) -> Path:  # a venv's python is a symlink: compare where it is called
        return Path(os.path.abspath(exe)).parent
    return bin_dir(str(marker.get("python", ""))) == bin_dir(python)


def standalone_paths(root: str | os.PathLike = "dreambooth_ui",
                     checkpoints_dir: str | os.PathLike | None = None,
                     lora_dir: str | os.PathLike | None = None,
                     data_dir: str | os.PathLike | None = None,
                     embeddings_dir: str | os.PathLike | None = None) -> HostPaths:
    root = Path(root)
    return HostPaths(checkpoints_dir=Path(checkpoints_dir) if checkpoints_dir else root / "models",
                     lora_dir=Path(lora_dir) if lora_dir else root / "lora",
                     work_dir=root / "dreambooth", lib_dir=PACKAGE_ROOT / "lib",
                     data_dir=Path(data_dir) if data_dir else None,
                     embeddings_dir=Path(embeddings_dir) if embeddings_dir else root / "embeddings")


def scan_checkpoints(folder: Path) -> list[Checkpoint]:
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES
                   and p.is_file())
    return [Checkpoint(str(p.relative_to(folder)), str(p)) for p in files]


def read_safetensors_header(path: str | os.PathLike, limit: int = 100 * 2**20) -> dict:
    """The JSON header of a .safetensors file (tensor names, shapes, metadata), without torch.
    Only a regular file is opened (a FIFO or device would block or never end). ValueError, in
    words, for anything that is not such a header."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError("it is not a regular file")
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise ValueError("it is shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > limit:
            raise ValueError(f"its header claims {size} bytes")
        try:
            header = json.loads(fh.read(size))
        except (ValueError, RecursionError):  # not JSON, not UTF-8, a 5000-digit number
            raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    if not isinstance(header.get("__metadata__", {}), dict):
        raise ValueError("its __metadata__ is not a JSON object")
    return header


def sniff_model_type(path: str | os.PathLike, strict: bool = False) -> str | None:
    """The model family of a single-file checkpoint from its tensor names, metadata and the
    WebUI's `<name>.yaml` beside it (safetensors only; no tensor is read), or None when it
    can't be told this way. The rules are dreambooth.model.detect's, the ones training applies.
    `strict`: a .safetensors file whose header can't be read is a CheckpointError, in words
    (else None)."""
    from ..config.errors import CheckpointError
    from ..model.detect import detect_model_type
    try:
        header = read_safetensors_header(path)
        yaml = Path(path).with_suffix(".yaml")
        yaml_text = yaml.read_text(encoding="utf-8", errors="replace") if yaml.is_file() else None
    except (OSError, ValueError) as e:
        if strict and str(path).lower().endswith(".safetensors"):
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CheckpointError(f"'{Path(path).name}' can't be read as a safetensors "
                                  f"checkpoint: {why}.", "Choose another checkpoint; this file "
                                  "is damaged or not a checkpoint.") from None
        return None
    meta = header.pop("__metadata__", None) or {}
    return detect_model_type(header, meta, yaml_text)


def types_without_flux() -> tuple:
    """The model types a host without Flux and SD3.5 (AUTOMATIC1111 1.10) can load."""
    from ..config.flux import FLUX_TYPES
    from ..config.schema import MODEL_TYPES
    from ..config.sd35 import SD35_TYPES
    return tuple(t for t in MODEL_TYPES if t not in FLUX_TYPES + SD35_TYPES)


def host_defaults(host: Host) -> dict[str, str]:
    """Where the host wants outputs: its checkpoints folder, its Lora folder, its work dir (and
    the T5 tokenizer it ships, for Flux)."""
    wanted = {"work_dir": host.paths.work_dir, "output_dir": host.paths.checkpoints_dir,
              "lora_dir": host.paths.lora_dir, "embedding_dir": host.paths.embeddings_dir}
    if host.t5_tokenizer_dir and Path(host.t5_tokenizer_dir).is_dir():
        wanted["t5_tokenizer_dir"] = host.t5_tokenizer_dir
    return {k: str(v) for k, v in wanted.items()}
