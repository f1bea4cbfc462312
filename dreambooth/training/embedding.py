"""Textual inversion and pivotal tuning: a new token's embedding, trained alone (method
'textual_inversion') or with a LoRA (method 'lora', pivotal), saved as the embedding file the
WebUI loads from its embeddings folder.

How it trains: `embedding_vectors` placeholder tokens are added to each tokenizer and the word
`embedding_token` of a prompt becomes them before tokenizing. Each text encoder's token
embedding is wrapped (`TokenVectors`): a placeholder reads a trainable vector (initialised from
`embedding_init_word`), every other token reads the original matrix, frozen and untouched. That
is what the WebUI does with an embedding named in a prompt: its vectors take the place of the
name's tokens. Placeholder ids reach the encoder negative (a pre-hook maps them), so CLIP's
pooled output, which takes the position of the largest id as the end of the text, is unchanged.

The file (what WebUI 1.10.1 `create_embedding_from_data` reads): SD 1.x/2.x one tensor
`emb_params` [vectors, width]; SDXL `clip_l` [vectors, 768] and `clip_g` [vectors, 1280]. The
WebUI names an embedding by its file name: the word to write in a prompt.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config.checks import token_in
from ..config.errors import DreamboothError
from ..model.checkpoint import SAVE_DTYPES, cast_for_save
from ..model.metadata import model_metadata
from .lora import put_module

PLACEHOLDER = "<dreambooth-embedding-{}>"
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SINGLE_KEY = "emb_params"


class TokenVectors(torch.nn.Module):
    """A token embedding whose negative ids -1, -2, ... read trainable `vectors`; every other id
    reads the frozen original `weight` (kept under its own state-dict key)."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor) -> None:
        super().__init__()
        self.weight = base.weight
        self.vectors = torch.nn.Parameter(vectors)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = past_vocabulary(ids, self.weight.shape[0])
        out = F.embedding(ids.clamp(min=0), self.weight)
        rows = self.vectors[(-ids - 1).clamp(0, len(self.vectors) - 1)].to(out.dtype)
        return torch.where((ids < 0)[..., None], rows, out)


def past_vocabulary(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Ids past the vocabulary (the placeholders: vocab, vocab + 1, ...) as -1, -2, ..."""
    return torch.where(ids >= vocab, vocab - 1 - ids, ids)


def _negative_ids(vocab: int):
    """A text encoder pre-hook: ids past the vocabulary (the placeholders) become -1, -2, ..."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        ids = past_vocabulary(ids, vocab)
        if "input_ids" in kwargs:
            return args, {**kwargs, "input_ids": ids}
        return (ids, *args[1:]), kwargs
    return hook


def _token_embedding(text_encoder):
    return text_encoder.get_input_embeddings()


def init_ids(cfg, comp) -> list[int]:
    """The token id of embedding_init_word in each tokenizer; refused unless it is one token."""
    out = []
    for tokenizer in comp.tokenizers:
        ids = tokenizer(cfg.embedding_init_word.strip(), add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise DreamboothError(f"embedding_init_word '{cfg.embedding_init_word}' is {len(ids)} "
                                  "tokens, not one.", "Choose a common word that CLIP knows as "
                                  "one token, e.g. 'dog', 'woman', 'style', or '*'.")
        out.append(ids[0])
    return out


def install(cfg, comp) -> None:
    """Wrap each text encoder's token embedding and teach the prompts the placeholders (does
    nothing unless cfg trains an embedding)."""
    if not cfg.trains_embedding:
        return
    n = cfg.embedding_vectors
    placeholders = [PLACEHOLDER.format(i) for i in range(n)]
    for tokenizer, te, first in zip(comp.tokenizers, comp.text_encoders, init_ids(cfg, comp)):
        base = _token_embedding(te)
        vocab = base.weight.shape[0]
        tokenizer.add_tokens(placeholders)
        ids = tokenizer.convert_tokens_to_ids(placeholders)
        if ids != list(range(vocab, vocab + n)):
            raise DreamboothError(f"The tokenizer gave the embedding's tokens the ids {ids}, not "
                                  f"the {n} after the text encoder's {vocab}.",
                                  "This is a bug; please report it with the log.")
        init = base.weight.detach()[first].float().repeat(n, 1).clone()
        _replace(te, base, TokenVectors(base, init))
        te.register_forward_pre_hook(_negative_ids(vocab), with_kwargs=True)
    pattern, spelled = word_pattern(cfg.embedding_token), " ".join(placeholders)
    comp.rewrite_prompt = lambda prompt: pattern.sub(spelled, prompt)


def word_pattern(token: str) -> re.Pattern:
    """`token` as a word of its own (not inside a longer word)."""
    return re.compile(rf"(?<![\w]){re.escape(token.strip())}(?![\w])")


def _path_of(module, target) -> str:
    return next(name for name, m in module.named_modules() if m is target)


def _replace(module, old, new) -> None:
    put_module(module, _path_of(module, old), new)


def vectors_of(comp) -> list[torch.Tensor]:
    """The trained vectors of each text encoder (the parameters, not copies)."""
    return [_token_embedding(te).vectors for te in comp.text_encoders]


def embedding_groups(cfg, comp) -> list[dict]:
    """The optimizer group of the embedding's vectors (fp32, set to train)."""
    params = vectors_of(comp)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return [{"params": params, "lr": cfg.embedding_learning_rate}]


# -- the file ------------------------------------------------------------------------------
def embedding_state(comp) -> dict:
    """The tensors of the WebUI's embedding file."""
    vectors = [v.detach().float().cpu().contiguous() for v in vectors_of(comp)]
    if comp.spec.family == "sdxl":
        return {SDXL_KEYS[s.component]: v for s, v in zip(comp.spec.text_encoders, vectors)}
    return {SINGLE_KEY: vectors[0]}


def save_embedding(comp, path: Path, cfg, steps: int, given: dict, precision: str,
                   overwrite: bool = False) -> Path:
    """Write the embedding file (checked against its layout before it takes its name)."""
    from ..model.filecheck import write_verified
    state = cast_for_save(embedding_state(comp), precision)
    expected = {k: tuple(v.shape) for k, v in state.items()}
    meta = model_metadata(comp.spec, path.stem, given)
    meta.update({"modelspec.architecture": comp.spec.architecture + "/textual-inversion",
                 "name": path.stem, "step": str(steps),
                 "sd_checkpoint_name": Path(cfg.source_checkpoint).stem,
                 "dreambooth.model_type": comp.model_type,
                 "dreambooth.token": cfg.embedding_token.strip(),
                 "dreambooth.init_word": cfg.embedding_init_word.strip(),
                 "dreambooth.vectors": str(cfg.embedding_vectors)})
    return write_verified(path, state, meta, expected, overwrite=overwrite,
                          dtype=SAVE_DTYPES[precision], what="embedding")


def activation_text(cfg, name: str) -> str:
    """The instance prompts with the token replaced by the embedding's name (the word the
    WebUI knows it by)."""
    token, pattern = cfg.embedding_token.strip(), word_pattern(cfg.embedding_token)
    prompts = [c.instance_prompt.replace("[filewords]", "").strip() for c in cfg.concepts]
    return ", ".join(dict.fromkeys(pattern.sub(name, p) for p in prompts
                                   if token_in(token, p)))
