"""The training stage: the run itself.

In: a validated `TrainingConfig`, an event listener and a cancel token. Out: the trained files
(checkpoint, LoRA, merged checkpoint, samples), the working model for the next run, resumable
state snapshots, and `TrainResult`; events (started, step, saved, finished, failed) on the way.

`trainer` reads top to bottom (plan -> load -> feed -> loop -> save) and composes a
`data.feed.DataFeed` and a `saver.Saver`; `loss`, `optim`, `backends` (attention, optimizers,
precision), `lora`, `fp8` (a frozen UNet stored in fp8), `state` (snapshots, the run lock) and
`memory` (estimate, presets, advice) are the parts it uses. Imports the data, model and config stages only; importing this package
loads nothing.
"""
