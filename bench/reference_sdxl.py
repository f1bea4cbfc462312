"""The SDXL reference: one training step as diffusers'
examples/dreambooth/train_dreambooth_lora_sdxl.py takes it at its defaults, re-created here from
the diffusers, transformers, peft and accelerate public APIs (the SD1.5 one is reference.py).

What differs from train_dreambooth.py, read from the script:
- the instance images are resized (lanczos, shorter side), randomly cropped, turned into
  tensors and normalised once, when its dataset is built; each keeps its original size and
  crop corner; a step stacks its batch, which accelerate's DataLoader sends to the device;
- both text encoders are frozen, cast to the mixed precision dtype, and encode the instance
  prompt once before training (the penultimate hidden states of both side by side, the second
  one's pooled projection); a step repeats those for its batch. They stay on the device;
- the VAE stays fp32 ("always in float32 to avoid NaN losses"): a step encodes in fp32, then
  scales the latents and casts them to the mixed precision dtype (so the noise is drawn in it);
- each image's add_time_ids (original size, crop corner, target size) is made on the host and
  copied to the device in the mixed precision dtype, every step (a blocking copy per image);
- LoRA rank r (the case's: the script's default is 4), alpha r, dropout 0, gaussian init, on
  the UNet's to_k/to_q/to_v/to_out.0 through peft (`add_adapter`), over the UNet cast to the
  mixed precision dtype; the LoRA weights are cast to fp32 under fp16 only, so under bf16 they
  train in bf16; AdamW (lr 1e-4, weight decay 1e-4, betas 0.9/0.999, eps 1e-8) over them;
  `zero_grad()` (grads set to None); clipping at 1.0; the loss read every step, as there.

With lora_rank 0 (a full fine-tune): diffusers has no SDXL DreamBooth script that trains the
whole UNet, so this is the step above with the UNet trained as train_dreambooth.py trains it:
fp32 weights under autocast, AdamW lr 5e-6 and weight decay 1e-2, `zero_grad(set_to_none=False)`.
Not modelled (our SDXL cases use neither): prior preservation, a trained text encoder.
"""
from __future__ import annotations

import random

import torch

from .reference import WEIGHT_DTYPES, ReferenceStep, _tokenize, accelerator, normalised


class PreparedImages(torch.utils.data.Dataset):
    """The instance images, transformed once as the SDXL script's dataset does in __init__."""

    def __init__(self, paths, size: int) -> None:
        rng = random.Random(0)
        self.items = [_prepare(path, size, rng) for path in paths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _prepare(path, size: int, rng: random.Random) -> dict:
    from PIL import Image, ImageOps
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    original = (img.height, img.width)
    scale = size / min(img.size)
    img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                     Image.LANCZOS)
    top, left = rng.randint(0, img.height - size), rng.randint(0, img.width - size)
    return {"pixels": normalised(img.crop((left, top, left + size, top + size))),
            "original_size": original, "crop_top_left": (top, left)}


def _collate(examples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([e["pixels"] for e in examples]).to(
                memory_format=torch.contiguous_format).float(),
            "original_sizes": [e["original_size"] for e in examples],
            "crop_top_lefts": [e["crop_top_left"] for e in examples]}


@torch.no_grad()
def encode_once(comp, prompt: str, device) -> dict:
    """The prompt through both frozen encoders: penultimate hidden states side by side [1, 77,
    D1 + D2] and the second encoder's pooled projection [1, P], kept on the device."""
    states = []
    for tokenizer, encoder in zip(comp.tokenizers, comp.text_encoders):
        out = encoder(_tokenize(tokenizer, prompt)[0].to(device), output_hidden_states=True,
                      return_dict=False)
        pooled = out[0]  # the projection of the encoder with one (the last)
        states.append(out[-1][-2])
    return {"hidden": torch.cat(states, dim=-1).to(device), "pooled": pooled.to(device)}


class SDXLReferenceStep(ReferenceStep):
    script = "train_dreambooth_lora_sdxl.py"

    def __init__(self, comp, data, batch_size: int, train_text_encoder: bool, prior: bool,
                 precision: str, lora_rank: int = 0, acc=None) -> None:
        from diffusers import DDPMScheduler
        if train_text_encoder or prior:
            raise ValueError("the SDXL reference models neither a trained text encoder nor "
                             "prior preservation")
        self.acc = acc if acc is not None else accelerator(precision)
        self.prior, self.train_te, self.lora = False, False, lora_rank
        self.resolution = data.resolution
        self.noise_scheduler = DDPMScheduler.from_config(comp.configs["scheduler"])
        self.weight_dtype = WEIGHT_DTYPES.get(self.acc.mixed_precision, torch.float32)
        device = self.acc.device
        self.vae = comp.vae.requires_grad_(False).to(device, dtype=torch.float32)
        self.text_encoders = [te.requires_grad_(False).to(device, dtype=self.weight_dtype)
                              for te in comp.text_encoders]
        self.params = self.trainable(comp.unet, None, precision)
        self.lr, self.weight_decay = (1e-4, 1e-4) if lora_rank else (5e-6, 1e-2)
        self.embeddings = encode_once(comp, data.prompt, device)
        dataset = PreparedImages(data.instance, data.resolution)
        self.unet, = self.prepare((comp.unet,), dataset, batch_size, _collate)
        self.unet.train()
        self.attention = type(next(iter(comp.unet.attn_processors.values()))).__name__

    def lora_targets(self, unet) -> list[str]:
        return ["to_k", "to_q", "to_v", "to_out.0"]

    def step(self) -> float:
        batch, acc, unet = self.next_batch(), self.acc, self.unet
        with acc.accumulate(unet):
            pixels = batch["pixel_values"].to(dtype=self.vae.dtype)
            latents = self.vae.encode(pixels).latent_dist.sample()
            latents = (latents * self.vae.config.scaling_factor).to(self.weight_dtype)
            noise = torch.randn_like(latents)
            n = latents.shape[0]
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,),
                                      device=latents.device).long()
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            time_ids = torch.cat([self.time_ids(size, corner) for size, corner in
                                  zip(batch["original_sizes"], batch["crop_top_lefts"])])
            added = {"time_ids": time_ids,
                     "text_embeds": self.embeddings["pooled"].repeat(n, 1)}
            pred = unet(noisy, timesteps, self.embeddings["hidden"].repeat(n, 1, 1),
                        added_cond_kwargs=added, return_dict=False)[0]
            loss = self.loss(pred, latents, noise, timesteps)
            self.update(loss)
        return loss.detach().item()  # the script logs it every step

    def time_ids(self, original_size, crop_top_left) -> torch.Tensor:
        ids = torch.tensor([list(original_size) + list(crop_top_left)
                            + [self.resolution, self.resolution]])
        return ids.to(self.acc.device, dtype=self.weight_dtype)

    def resident(self) -> tuple:
        return self.unet, self.vae, *self.text_encoders, self.optimizer, self.embeddings

    def settings(self) -> dict:
        return {**super().settings(),
                "unet": f"base in {self.weight_dtype}, LoRA in {self.params[0].dtype}"
                if self.lora else "fp32 weights under autocast",
                "latents": "VAE (fp32) every step",
                "text": "both encoders once, before training",
                "time_ids": "made on the host, copied every step"}
