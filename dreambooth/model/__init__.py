"""The model stage: Stable Diffusion checkpoints and the working model.

In: a single-file checkpoint (.safetensors, or .ckpt read by an allow-list unpickler) and a model
type, or a model's working folder. Out: `Components` (UNet, VAE, text encoders, tokenizers,
scheduler config) in fp32, and back again: the single file in the exact key layout the WebUI
loads (checked against the layout its configs imply before it takes its name), the `.yaml`
beside it, modelspec metadata, and the diffusers-layout working folder the next run goes on from.

`spec` holds the model types as data, `components` builds and fills the working model,
`single_file` converts (with `convert` and `openclip`), `detect` tells the type of a file,
`checkpoint`/`filecheck` read and write files safely, `workdir` keeps the working folder and
chooses where a run starts from, `tiny` builds the tiny test and demo models.
Imports only `dreambooth.config` (and `dreambooth.assets`) of this package; importing this
package itself loads nothing.
"""
