"""The reference: one training step as diffusers' examples/dreambooth/train_dreambooth.py takes
it at its defaults, re-created here from the diffusers, transformers and accelerate public APIs.

What "its defaults" are (read from the script): the UNet (and a trained text encoder) stay fp32
and run under accelerate's autocast; the VAE and a frozen text encoder are cast to the mixed
precision dtype; the images are loaded and transformed every step by a DataLoader with no
workers (resize, random crop, to tensor, normalise); the VAE encodes them every step and the text
encoder encodes the prompt ids every step (no pre-computed embeddings); torch.optim.AdamW
(betas 0.9/0.999, weight decay 1e-2, eps 1e-8, lr 5e-6); constant lr schedule; gradient
clipping at 1.0; `zero_grad(set_to_none=False)`; no gradient checkpointing; the attention
processor diffusers installs by default; with prior preservation the class half is
concatenated to the batch and its loss added with weight 1.0.

LoRA (as examples/dreambooth/train_dreambooth_lora.py): the frozen UNet is cast to the mixed
precision dtype, peft LoRA layers (rank r, alpha r, gaussian init) go on to_q/to_k/to_v/to_out.0
(and add_k_proj/add_v_proj where present); they are cast to fp32 only under fp16; AdamW over
them alone, lr 5e-4; the rest of the step is the same.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from .measure import move


class DreamBoothImages(torch.utils.data.Dataset):
    """Instance (and class) images with their prompt ids, transformed as the script does."""

    def __init__(self, instance, tokenizer, prompt, size, classes=None, class_prompt=""):
        self.instance, self.classes, self.size = list(instance), list(classes or []), size
        self.ids = _tokenize(tokenizer, prompt)
        self.class_ids = _tokenize(tokenizer, class_prompt) if self.classes else None
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def __getitem__(self, i: int) -> dict:
        example = {"pixels": self._load(self.instance[i % len(self.instance)]), "ids": self.ids}
        if self.classes:
            example["class_pixels"] = self._load(self.classes[i % len(self.classes)])
            example["class_ids"] = self.class_ids
        return example

    def _load(self, path) -> torch.Tensor:
        """Resize the shorter side (bilinear), random crop, to [0, 1], normalise to [-1, 1]."""
        from PIL import Image, ImageOps
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
        scale = self.size / min(img.size)
        img = img.resize((max(self.size, round(img.width * scale)),
                          max(self.size, round(img.height * scale))), Image.BILINEAR)
        left = self.rng.randint(0, img.width - self.size)
        top = self.rng.randint(0, img.height - self.size)
        img = img.crop((left, top, left + self.size, top + self.size))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (arr - 0.5) / 0.5


def _tokenize(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, truncation=True, padding="max_length",
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


def _collate(examples: list[dict]) -> dict:
    pixels = [e["pixels"] for e in examples] + [e["class_pixels"] for e in examples
                                                 if "class_pixels" in e]
    ids = [e["ids"] for e in examples] + [e["class_ids"] for e in examples if "class_ids" in e]
    return {"pixel_values": torch.stack(pixels).to(memory_format=torch.contiguous_format).float(),
            "input_ids": torch.cat(ids, dim=0)}


class ReferenceStep:
    """The reference training step over a given (randomly initialised) model."""

    name = "reference"

    def __init__(self, comp, data, batch_size: int, train_text_encoder: bool, prior: bool,
                 precision: str, lora_rank: int = 0) -> None:
        from accelerate import Accelerator
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        self.acc = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
        self.prior, self.train_te, self.lora = prior, train_text_encoder, lora_rank
        self.noise_scheduler = DDPMScheduler.from_config(comp.configs["scheduler"])
        unet, vae, te = comp.unet, comp.vae, comp.text_encoder
        vae.requires_grad_(False)
        te.requires_grad_(train_text_encoder)
        self.params = self.trainable(unet, te, precision)
        optimizer = torch.optim.AdamW(self.params, lr=5e-4 if lora_rank else 5e-6,
                                      betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        dataset = DreamBoothImages(data.instance, comp.tokenizer, data.prompt, data.resolution,
                                   data.classes if prior else None, data.class_prompt)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             collate_fn=_collate, num_workers=0)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500,
                                     num_training_steps=10**6)
        models = (unet, te) if train_text_encoder else (unet,)
        prepared = self.acc.prepare(*models, optimizer, loader, lr_scheduler)
        self.unet = prepared[0]
        self.text_encoder = prepared[1] if train_text_encoder else te
        self.optimizer, self.loader, self.lr_scheduler = prepared[-3:]
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            self.acc.mixed_precision, torch.float32)
        self.vae = vae.to(self.acc.device, dtype=self.weight_dtype)
        if not train_text_encoder:
            te.to(self.acc.device, dtype=self.weight_dtype)
        self.unet.train()
        if train_text_encoder:
            self.text_encoder.train()
        self.batches = iter(())
        self.attention = type(next(iter(comp.unet.attn_processors.values()))).__name__

    def trainable(self, unet, te, precision: str) -> list:
        if not self.lora:
            return list(unet.parameters()) + (list(te.parameters()) if self.train_te else [])
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        unet.requires_grad_(False)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        unet.to(self.acc.device, dtype=dtype)
        targets = ["to_k", "to_q", "to_v", "to_out.0"] + [
            t for t in ("add_k_proj", "add_v_proj")
            if any(n.endswith(t) for n, _ in unet.named_modules())]
        unet.add_adapter(LoraConfig(r=self.lora, lora_alpha=self.lora,
                                    init_lora_weights="gaussian", target_modules=targets))
        if precision == "fp16":
            cast_training_params([unet], dtype=torch.float32)
        return [p for p in unet.parameters() if p.requires_grad]

    def next_batch(self) -> dict:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> float:
        batch, acc, unet = self.next_batch(), self.acc, self.unet
        with acc.accumulate(unet):
            pixels = batch["pixel_values"].to(dtype=self.weight_dtype)
            latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps,
                                      (latents.shape[0],), device=latents.device).long()
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            hidden = self.text_encoder(batch["input_ids"].to(self.acc.device))[0]
            pred = unet(noisy, timesteps, hidden).sample
            loss = self.loss(pred, latents, noise, timesteps)
            acc.backward(loss)
            if acc.sync_gradients:
                acc.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=bool(self.lora))  # the LoRA script's default
        return loss.detach().item()

    def loss(self, pred, latents, noise, timesteps) -> torch.Tensor:
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        if not self.prior:
            return F.mse_loss(pred.float(), target.float(), reduction="mean")
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
        return F.mse_loss(pred.float(), target.float(), reduction="mean") + 1.0 * prior

    def to(self, device) -> None:
        for obj in (self.unet, self.vae, self.text_encoder, self.optimizer):
            move(obj, device)

    def settings(self) -> dict:
        return {"attention": self.attention, "optimizer": "torch.optim.AdamW (foreach)",
                "latents": "VAE every step", "text": "text encoder every step",
                "zero_grad": f"set_to_none={bool(self.lora)}", "lora_rank": self.lora}

    def close(self) -> None:
        self.acc.free_memory()
