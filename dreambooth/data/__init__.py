"""The data stage: what a run learns from.

In: the concepts of a `TrainingConfig` (instance folders, prompts, captions, class prompts) and
the working model. Out: image items with their prompts, aspect-ratio buckets, class images
generated where missing, latents and prompt embeddings cached once, and each step's batch
(`feed.DataFeed`), drawn so that N processes see what one process with N times the batch would.

`images` finds and checks images, `captions` reads their captions, `buckets` plans sizes and
crops, `sampling` generates images (class images, previews), `feed` composes them for training.
Imports `dreambooth.model` and `dreambooth.config` only; importing this package loads nothing.
"""
