"""The data side of a training run: the images and prompts of the concepts, their cached latents
and embeddings, and each step's batch.

`DataFeed` owns all of it: it is given the config, the working model, the accelerator (for the
process layout), the mixed-precision dtype and a way to talk; it keeps the items, buckets,
caches and the class-image cursor, and answers `batch(order, b, rng, gen)`. The trainer holds
one and never reaches into its caches."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from ..config.runlog import host_out_of_memory, out_of_host_memory
from ..model.components import encode_prompts
from . import buckets
from .buckets import load_bucketed
from .images import Item, instance_items
from .sampling import ensure_class_images, preview_prompt, slug


class DataFeed:
    def __init__(self, cfg, comp, acc, dtype: torch.dtype, say, warn) -> None:
        self.cfg, self.comp, self.acc, self.dtype = cfg, comp, acc, dtype
        self.device, self.say, self.warn = acc.device, say, warn
        self.items: list[Item] = []
        self.class_items: dict[int, list[Item]] = {}
        self.bucket_of: dict = {}
        self.latents: dict = {}
        self.embeddings: dict = {}
        self.class_cursor = 0  # which class image the next prior row takes (saved in snapshots)

    @property
    def class_count(self) -> int:
        return sum(len(v) for v in self.class_items.values())

    def collect(self, make_ready_to_generate) -> None:
        """Find every instance image (and make the missing class images: the UNet goes to the
        device first, through `make_ready_to_generate`), then plan the buckets. Flux / SD3.5:
        the prompts' states are cached first, so T5 can leave the device before the transformer
        comes to it (class images are drawn from the states)."""
        cfg, self.items, self.class_items, self.embeddings = self.cfg, [], {}, {}
        buckets.refuse_resolution(cfg.resolution, self.comp.vae.config, self.comp.unet.config)
        found = [instance_items(c.instance_data_dir, c.instance_prompt, self.warn)
                 for c in cfg.concepts]
        for i, items in enumerate(found):
            self.items += [Item(it.path, it.prompt, False, i) for it in items]
        flow = self.comp.spec.flow
        if flow and any(c.uses_prior for c in cfg.concepts):
            self.cache_prompts()
        for i, concept in enumerate(cfg.concepts):
            if concept.uses_prior:
                folder = Path(concept.class_data_dir) if concept.class_data_dir else \
                    cfg.model_dir / "class_images" / slug(concept.class_prompt)
                make_ready_to_generate()  # to make any that are missing
                with self.acc.main_process_first():  # rank 0 makes them, the others reuse them
                    paths = ensure_class_images(self.comp, concept, concept.class_images_per_instance
                                                * len(found[i]), folder, cfg, self.device,
                                                self.dtype, self.say,
                                                self.embeddings if flow else None)
                self.class_items[i] = [Item(p, concept.class_prompt, True, i) for p in paths]
        self.bucket_of = buckets.plan([it.path for it in self.items], cfg.resolution,
                                      cfg.bucketing, cfg.bucket_no_upscale)
        if cfg.bucketing:
            self.say("Aspect-ratio buckets (width x height: images): "
                     + buckets.describe(list(self.bucket_of.values())) + ".")
        prompts = [it.prompt for it in self.items] + \
            [it.prompt for pool in self.class_items.values() for it in pool]
        warn_long_prompts(self.comp, prompts, self.warn)

    @torch.no_grad()
    def encode_images(self, pairs: list, flip: bool) -> list:
        """(mean, std, size conditioning) of each (item, bucket)'s latent distribution (sampled
        afresh every step)."""
        out, rng = [], random.Random(self.cfg.seed)
        for it, bucket in pairs:
            try:
                pixels, geometry = load_bucketed(it.path, bucket, self.cfg.center_crop, rng, flip)
                out.append((*self.vae_encode(pixels), geometry))
            except (MemoryError, RuntimeError) as e:
                if not host_out_of_memory(e):
                    raise
                native = self.comp.spec.resolution
                raise out_of_host_memory(
                    f"encoding '{it.path.name}' at {bucket[0]}x{bucket[1]}", e,
                    f"Lower resolution (this model was made for {native}), or close other "
                    "programs to free memory.") from None
        return out

    @torch.no_grad()
    def vae_encode(self, pixels: torch.Tensor) -> tuple:
        """(mean, std) of an image's latent distribution, in fp32: the fp32 VAE runs under
        autocast in the mixed precision (not in fp16 for SDXL, whose VAE overflows there)."""
        vae, dtype = self.comp.vae, self.dtype
        if self.comp.spec.family == "sdxl" and dtype == torch.float16:
            dtype = torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            dist = vae.encode(pixels[None].to(self.device, vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict:
        return encode_prompts(self.comp, prompts, self.device)

    def cache(self) -> None:
        """Latents of every (image, bucket) a batch can use (class images: every bucket of their
        concept's instance images), and the prompt embeddings when the text encoder is frozen
        (cache_prompts: those collect cached already are kept)."""
        cfg, self.latents = self.cfg, {}
        pairs = [(it, self.bucket_of[it.path]) for it in self.items]
        for concept, pool in self.class_items.items():
            used = sorted({self.bucket_of[it.path] for it in self.items if it.concept == concept})
            pairs += [(it, b) for b in used for it in pool]
        if cfg.cache_latents:
            for flip in ((False, True) if cfg.hflip else (False,)):
                for (it, b), lat in zip(pairs, self.encode_images(pairs, flip)):
                    self.latents[(it.path, flip, b)] = lat
        if not cfg.trains_text_encoder:
            self.cache_prompts()

    def cache_prompts(self) -> None:
        """The states of every prompt a batch can read (the class prompts' included), and of a
        flow model's previews' prompts, with SD3.5's negative (the empty prompt, for its CFG), so
        that T5 never comes back to the device; each encoded once."""
        cfg = self.cfg
        prompts = {it.prompt for it in self.items} | \
            {c.class_prompt for c in cfg.concepts if c.uses_prior}
        if self.comp.spec.flow:  # (drawn from these: saver.sample)
            prompts |= {preview_prompt(c) for c in cfg.concepts} | \
                ({""} if self.comp.spec.family == "sd3" else set())
        for prompt in sorted(prompts - self.embeddings.keys()):
            self.embeddings[prompt] = {k: v[0] for k, v in
                                       self.encode_prompts([prompt]).items()}

    def global_batch(self, order: list[int], b: int) -> tuple[list[Item], list[int]]:
        """The b-th global batch (batch size x processes; the last one wraps around): instance
        items, then one class item per instance item whose concept has prior preservation.
        Returns (items, owner) where owner[i] is the instance row a row belongs to."""
        gbs = self.cfg.batch_size * self.acc.num_processes
        inst = [self.items[order[(b * gbs + k) % len(order)]] for k in range(gbs)]
        cls, owner = [], list(range(gbs))
        for row, it in enumerate(inst):
            pool = self.class_items.get(it.concept)
            if pool:
                cls.append(pool[self.class_cursor % len(pool)])
                owner.append(row)
                self.class_cursor += 1
        return inst + cls, owner

    def batch(self, order: list[int], b: int, rng: random.Random, gen: torch.Generator,
              encoders: list | None = None):
        """(latents, text conditioning, size conditioning, n_instance, rows, global size) of this
        process's share of the global batch, all of one bucket. Every random draw is made for the
        whole global batch on every process, so N processes see exactly what one process with N
        times the batch would. `encoders`: the text encoders being trained (their prompts are
        encoded with grad every step); None: the cached embeddings."""
        items, owner = self.global_batch(order, b)
        bs, rank = self.cfg.batch_size, self.acc.process_index
        bucket = self.bucket_of[items[0].path]  # instance rows come first; class rows follow it
        rows = [i for i, o in enumerate(owner) if rank * bs <= o < (rank + 1) * bs]
        flips = [self.cfg.hflip and rng.random() < 0.5 for _ in items]
        seeds = [rng.getrandbits(32) for _ in items]
        eps = torch.randn((len(items), *buckets.latent_shape(self.comp.vae.config, bucket)),
                          generator=gen, device=gen.device)
        drawn = [self.latent_of(items[i], flips[i], seeds[i], eps[i:i + 1], bucket) for i in rows]
        chosen = [items[i] for i in rows]
        if encoders:
            cond = encode_prompts(self.comp, [it.prompt for it in chosen], self.device, encoders)
        else:
            cond = {k: torch.stack([self.embeddings[it.prompt][k] for it in chosen])
                    for k in self.embeddings[chosen[0].prompt]}
        return torch.cat([d[0] for d in drawn]), cond, [d[1] for d in drawn], bs, rows, len(items)

    def latent_of(self, item: Item, flip: bool, seed: int, eps: torch.Tensor, bucket) -> tuple:
        """(scaled latent sample, SDXL size conditioning) of an image in a bucket."""
        if self.cfg.cache_latents:
            mean, std, geometry = self.latents[(item.path, flip, bucket)]
        else:
            with torch.no_grad():
                px, geometry = load_bucketed(item.path, bucket, self.cfg.center_crop,
                                             random.Random(seed), flip)
                mean, std = self.vae_encode(px)
        vae = self.comp.vae.config  # Flux's autoencoder also shifts its latents
        shift = getattr(vae, "shift_factor", None) or 0.0
        return (mean + std * eps.to(mean.device) - shift) * vae.scaling_factor, geometry


def warn_long_prompts(comp, prompts: list[str], warn) -> None:
    """One warning naming the prompts longer than the text encoder reads (CLIP: 77 tokens with
    its start and end marks), and how many tokens of each training drops."""
    tokenizer = comp.tokenizers[0]
    limit, long = tokenizer.model_max_length, []
    for prompt in dict.fromkeys(prompts):
        text = comp.rewrite_prompt(prompt) if comp.rewrite_prompt else prompt
        n = len(tokenizer(text, verbose=False).input_ids)
        if n > limit:
            long.append((prompt, n))
    if long:
        shown = "; ".join(f"'{p[:60]}{'...' if len(p) > 60 else ''}' ({n} tokens, the last "
                          f"{n - limit} dropped)" for p, n in long[:3])
        more = f" and {len(long) - 3} more" if len(long) > 3 else ""
        warn(f"{len(long)} prompt(s) are longer than the {limit} tokens the text encoder reads, "
             f"so training drops their ends: {shown}{more}. Shorten them to about "
             f"{limit - 2} tokens (some 50 words), putting what matters first.")
