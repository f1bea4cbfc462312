"""The reference: one training step as diffusers' examples/dreambooth/train_dreambooth.py takes
it at its defaults, re-created here from the diffusers, transformers and accelerate public APIs.

What "its defaults" are (read from the script): the UNet (and a trained text encoder) stay fp32
and run under accelerate's autocast; the VAE and a frozen text encoder are cast to the mixed
precision dtype; the images are loaded and transformed and the prompt tokenized every step by a
DataLoader with no workers (resize, random crop, to tensor, normalise; ids and attention mask),
and accelerate's DataLoader sends the batch's three tensors to the device (blocking copies);
the VAE encodes the images every step and the text encoder encodes the prompt ids every step
(no pre-computed embeddings); torch.optim.AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8,
lr 5e-6; its step counters on the CPU, as torch keeps them); constant lr schedule; gradient
clipping at 1.0; `zero_grad(set_to_none=False)`; no gradient checkpointing; the attention
processor diffusers installs by default; with prior preservation the class half is
concatenated to the batch and its loss added with weight 1.0; the loss read on the host every
step (`loss.detach().item()`, for the progress bar and the log).

LoRA (as examples/dreambooth/train_dreambooth_lora.py): the frozen UNet is cast to the mixed
precision dtype, peft LoRA layers (rank r, alpha r, gaussian init) go on to_q/to_k/to_v/to_out.0
(and add_k_proj/add_v_proj where present); they are cast to fp32 only under fp16; AdamW over
them alone, lr 5e-4; the rest of the step is the same.

SDXL: reference_sdxl.py (train_dreambooth_lora_sdxl.py).
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from .gpu_path import foreach_as_on_cuda, implementation
from .measure import free, move


class DreamBoothImages(torch.utils.data.Dataset):
    """Instance (and class) images with their prompt's ids and attention mask, as the script's
    dataset gives them: each image loaded and transformed, each prompt tokenized, per item."""

    def __init__(self, instance, tokenizer, prompt, size, classes=None, class_prompt=""):
        self.instance, self.classes, self.size = list(instance), list(classes or []), size
        self.tokenizer, self.prompt, self.class_prompt = tokenizer, prompt, class_prompt
        self.rng = random.Random(0)

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes))

    def __getitem__(self, i: int) -> dict:
        ids, mask = _tokenize(self.tokenizer, self.prompt)
        example = {"pixels": self._load(self.instance[i % len(self.instance)]), "ids": ids,
                   "mask": mask}
        if self.classes:
            ids, mask = _tokenize(self.tokenizer, self.class_prompt)
            example.update(class_pixels=self._load(self.classes[i % len(self.classes)]),
                           class_ids=ids, class_mask=mask)
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
        return normalised(img.crop((left, top, left + self.size, top + self.size)))


def normalised(img) -> torch.Tensor:
    """ToTensor then Normalize([0.5], [0.5]): [0, 255] -> [-1, 1], channels first."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - 0.5) / 0.5


def _tokenize(tokenizer, prompt: str) -> tuple:
    out = tokenizer(prompt, truncation=True, padding="max_length",
                    max_length=tokenizer.model_max_length, return_tensors="pt")
    return out.input_ids, out.attention_mask


def _collate(examples: list[dict]) -> dict:
    """Instances, then their class images; the batch accelerate's DataLoader sends to the
    device, all three tensors (the mask too, though the text encoder is not given it)."""
    def both(key: str) -> list:
        return [e[key] for e in examples] + [e["class_" + key] for e in examples
                                             if "class_" + key in e]
    return {"input_ids": torch.cat(both("ids"), dim=0),
            "pixel_values": torch.stack(both("pixels")).to(
                memory_format=torch.contiguous_format).float(),
            "attention_mask": torch.cat(both("mask"), dim=0)}


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's precisions


def accelerator(precision: str):
    """The Accelerator the scripts make, for one process (on a CPU when there is no CUDA)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # one per process, and our runs set theirs (as the trainer
    return Accelerator(mixed_precision=precision,  # does): the lowest preset's bf16 with
                       cpu=not torch.cuda.is_available())  # --precision no, before this one


class ReferenceStep:
    """The reference training step over a given (randomly initialised) model. `acc`: the
    accelerator (by default a real one; the step profile passes what it does in one process)."""

    name = "reference"
    script = "train_dreambooth.py"

    def __init__(self, comp, data, batch_size: int, train_text_encoder: bool, prior: bool,
                 precision: str, lora_rank: int = 0, acc=None) -> None:
        from diffusers import DDPMScheduler
        self.acc = acc if acc is not None else accelerator(precision)
        self.prior, self.train_te, self.lora = prior, train_text_encoder, lora_rank
        self.resolution = data.resolution
        self.noise_scheduler = DDPMScheduler.from_config(comp.configs["scheduler"])
        unet, vae, te = comp.unet, comp.vae, comp.text_encoder
        vae.requires_grad_(False)
        te.requires_grad_(train_text_encoder)
        self.params = self.trainable(unet, te, precision)
        self.lr, self.weight_decay = (5e-4 if lora_rank else 5e-6), 1e-2
        dataset = DreamBoothImages(data.instance, comp.tokenizer, data.prompt, data.resolution,
                                   data.classes if prior else None, data.class_prompt)
        models = (unet, te) if train_text_encoder else (unet,)
        prepared = self.prepare(models, dataset, batch_size, _collate)
        self.unet = prepared[0]
        self.text_encoder = prepared[1] if train_text_encoder else te
        self.weight_dtype = WEIGHT_DTYPES.get(self.acc.mixed_precision, torch.float32)
        self.vae = vae.to(self.acc.device, dtype=self.weight_dtype)
        if not train_text_encoder:
            te.to(self.acc.device, dtype=self.weight_dtype)
        self.unet.train()
        if train_text_encoder:
            self.text_encoder.train()
        self.attention = type(next(iter(comp.unet.attn_processors.values()))).__name__

    def prepare(self, models, dataset, batch_size: int, collate) -> tuple:
        """AdamW over self.params, a shuffling DataLoader with no workers, the constant lr
        schedule, all through accelerate's prepare(); the prepared models."""
        from diffusers.optimization import get_scheduler
        optimizer = torch.optim.AdamW(self.params, lr=self.lr, betas=(0.9, 0.999),
                                      weight_decay=self.weight_decay, eps=1e-8)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                             collate_fn=collate, num_workers=0)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=500,
                                     num_training_steps=10**6)
        prepared = self.acc.prepare(*models, optimizer, loader, lr_scheduler)
        self.optimizer, self.loader, self.lr_scheduler = prepared[-3:]
        foreach_as_on_cuda(self.optimizer)  # what torch picks on a GPU, on any device
        self.batches = iter(())
        return prepared[:-3]

    def trainable(self, unet, te, precision: str) -> list:
        if not self.lora:
            return list(unet.parameters()) + (list(te.parameters()) if self.train_te else [])
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        unet.requires_grad_(False)
        dtype = WEIGHT_DTYPES.get(precision, torch.float32)
        unet.to(self.acc.device, dtype=dtype)
        unet.add_adapter(LoraConfig(r=self.lora, lora_alpha=self.lora,
                                    init_lora_weights="gaussian",
                                    target_modules=self.lora_targets(unet)))
        if precision == "fp16":
            cast_training_params([unet], dtype=torch.float32)
        return [p for p in unet.parameters() if p.requires_grad]

    def lora_targets(self, unet) -> list[str]:
        """train_dreambooth_lora.py's: the attention projections, and add_k/add_v where present."""
        return ["to_k", "to_q", "to_v", "to_out.0"] + [
            t for t in ("add_k_proj", "add_v_proj")
            if any(n.endswith(t) for n, _ in unet.named_modules())]

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
            self.update(loss)
        return loss.detach().item()  # the script logs it every step

    def update(self, loss) -> None:
        """Backward, clipping at 1.0, the optimizer and lr steps, zero_grad (the LoRA scripts:
        set_to_none, torch's default; train_dreambooth.py: set_grads_to_none off)."""
        self.acc.backward(loss)
        if self.acc.sync_gradients:
            self.acc.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=bool(self.lora))

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

    def resident(self) -> tuple:
        """What the step keeps on the device."""
        return self.unet, self.vae, self.text_encoder, self.optimizer

    def to(self, device) -> None:
        for obj in self.resident():
            move(obj, device)

    def settings(self) -> dict:
        return {"script": self.script, "resolution": self.resolution,
                "attention": self.attention, "optimizer": f"torch.optim.AdamW [{implementation(self.optimizer)}]",
                "lr": self.lr, "weight_decay": self.weight_decay,
                "latents": "VAE every step", "text": "text encoder every step",
                "zero_grad": f"set_to_none={bool(self.lora)}", "lora_rank": self.lora}

    def close(self) -> None:
        free(self.acc)
