"""The network a LoRA run trains (`network`) and each type's own settings: their fields, the
targets they adapt, and their validation. Standard library only.

lora / locon / dora are kohya's LoRA layout (locon: also the ResNet convolutions; dora: plus a
magnitude per input column, `.dora_scale`, as the WebUI applies it); loha / lokr are LyCORIS's
Hadamard and Kronecker products (`.hada_*`, `.lokr_*`, with dora_wd a `.dora_scale` too); ia3,
full, glora and oft the rest of the family the WebUI 1.10.1 loads (`.weight`/`.on_input`,
`.diff`/`.diff_b`, `.a1.weight`..., `.oft_blocks`). Every type is one file the WebUI's
built-in Lora extension loads.
"""
from __future__ import annotations

from .errors import Problem
from .fieldspec import spec_field

NETWORKS = ("lora", "locon", "loha", "lokr", "dora", "ia3", "full", "glora", "oft")
LORA_TARGETS = ("attention", "transformer", "transformer+conv")
# one line each: what the tab shows beside the choice (and the README)
NETWORK_LINES = {
    "lora": "LoRA: a low-rank update (up x down) of each adapted layer; the usual choice.",
    "locon": "LoCon: LoRA also on the ResNet blocks' convolutions (lora_conv_rank / alpha): "
             "more of the model learns, a larger file.",
    "loha": "LoHa: the Hadamard product of two low-rank updates: a higher effective rank "
            "for the same file size; often chosen for styles.",
    "lokr": "LoKr: a Kronecker product of a small and a larger matrix: the smallest files; "
            "often chosen for styles.",
    "dora": "DoRA: LoRA plus a learnt magnitude per input column of each weight (the WebUI's "
            "convention; Flux, SD3.5: per output row, as Forge applies it): closer to a full "
            "fine-tune, slower steps.",
    "ia3": "(IA)3: a learnt scale per output of each adapted linear layer (per input for the "
           "feed-forward's second one): tiny files, learns the least.",
    "full": "Full: the whole change of each adapted layer's weight and bias: a fine-tune of "
            "those layers in a file, the largest.",
    "glora": "GLoRA: a low-rank update plus a low-rank change in proportion to the weight "
             "itself (linear layers only; glora_rank).",
    "oft": "OFT: turns each adapted weight's outputs by a learnt block-diagonal rotation "
           "(oft_block_size): keeps the weight's norms, hard to overtrain.",
}

NETWORK = spec_field("lora", "With method lora, the network trained (each line its name "
                     "in lowercase): " + " ".join(NETWORK_LINES.values()) + " Each is saved in "
                     "the layout the "
    "WebUI's Lora extension loads; lora_targets picks the layers for all of them. Flux and "
    "SD3.5 train lora, dora, loha and full (the others are refused, saying why).",
    choices=NETWORKS)
LOHA_RANK = spec_field(8, "With network 'loha', the rank of each of the two products (the "
                          "update's rank is up to its square).", advanced=True, minimum=1,
                       maximum=1024)
LOHA_ALPHA = spec_field(4.0, "With network 'loha', alpha: the update is scaled by alpha / "
                             "loha_rank.", advanced=True, minimum=0.001, maximum=10000.0)
LOKR_FACTOR = spec_field(8, "With network 'lokr', the size of the small Kronecker factor "
                            "(each dimension split as close to it as it divides; -1: as even "
                            "as possible). Larger: a larger file.", advanced=True, minimum=-1,
                         maximum=1024)
LOKR_RANK = spec_field(0, "With network 'lokr', 0: the larger factor is a full matrix (no "
                          "alpha, scale 1, as the WebUI applies it); above 0: that factor is "
                          "itself a low-rank product of this rank, scaled by lokr_alpha / "
                          "lokr_rank.", advanced=True, minimum=0, maximum=1024)
LOKR_ALPHA = spec_field(1.0, "With network 'lokr' and lokr_rank above 0, alpha (the update is "
                             "scaled by alpha / lokr_rank).", advanced=True, minimum=0.001,
                        maximum=10000.0)


GLORA_RANK = spec_field(8, "With network 'glora', the rank of its four factors (the update is "
                           "b2 @ b1 + W @ a2 @ a1, scale 1: the WebUI ignores alpha there).",
                        advanced=True, minimum=1, maximum=1024)
OFT_BLOCK_SIZE = spec_field(32, "With network 'oft', the size of each rotation block (each "
                                "layer's output count split into blocks of its largest divisor "
                                "up to this). Larger: more freedom, a larger file.",
                            advanced=True, minimum=1, maximum=1024)
OFT_CONSTRAINT = spec_field(0.0, "With network 'oft', 0: the rotations are free; above 0: their "
                                 "generator's norm is held within this times the output count "
                                 "(kohya's alpha for OFT, LyCORIS's constraint).", advanced=True,
                            minimum=0.0, maximum=1000.0)
DORA_WD = spec_field(False, "With network 'loha' or 'lokr', also learn a magnitude per input "
                            "column of each weight (DoRA's decomposition, LyCORIS's dora_wd), "
                            "as the WebUI applies it (Flux, SD3.5: per output row, as Forge "
                            "does): closer to a full fine-tune, slower steps.",
                     advanced=True)

TRAIN_NORM = spec_field(False, "With method lora, also learn a change of the weight and bias of "
                               "the norm layers in the UNet's transformer blocks (w_norm / "
                               "b_norm, LyCORIS's train_norm), beside any network. Not the text "
                               "encoders': Forge does not load those.", advanced=True)


def targets_of(cfg) -> str:
    """The layers the network adapts: lora_targets, with the ResNet convolutions for locon."""
    return "transformer+conv" if getattr(cfg, "network", "lora") == "locon" \
        else cfg.lora_targets


def check_network(cfg) -> list[Problem]:
    problems = []
    if cfg.network == "locon" and cfg.lora_targets == "attention":
        problems.append(Problem("lora_targets", "attention", "leaves out the transformer "
                                "layers that network 'locon' adapts beside the convolutions",
                                "set lora_targets to 'transformer' (locon adds the "
                                "convolutions), or choose network 'lora'"))
    if isinstance(cfg.lokr_factor, int) and cfg.lokr_factor == 0:
        problems.append(Problem("lokr_factor", 0, "splits no dimension",
                                "use -1 (as even as possible) or a factor of 1 or more, e.g. 8"))
    if cfg.network in ("ia3", "glora") and cfg.lora_targets == "transformer+conv":
        problems.append(Problem("lora_targets", "transformer+conv", f"asks for the ResNet "
                                f"convolutions, which network '{cfg.network}' can't adapt (the "
                                "WebUI applies it to linear layers only)",
                                "set lora_targets to 'transformer', or choose network 'locon', "
                                "'loha', 'lokr', 'full' or 'oft' for the convolutions"))
    if getattr(cfg, "dora_wd", False) and cfg.network not in ("loha", "lokr"):
        problems.append(Problem("dora_wd", True, f"adds DoRA's magnitude to network 'loha' or "
                                f"'lokr' only, not '{cfg.network}'",
                                "choose network 'dora' for LoRA with it, or turn dora_wd off"))
    return problems
