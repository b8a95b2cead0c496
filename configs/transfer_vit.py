"""The paper's ViT transfer: a pretrained ViT-S/16 fine-tuned on CIFAR-100 or Food-101 at 224 px
with CSAM, against SAM and ASAM; the dataset and the method chosen by the config string.

    python -m nonuniform_jax.main --config configs/transfer_vit.py:cifar100,csam --workdir /tmp/nu/tr_c100_csam
    python -m nonuniform_jax.main --config configs/transfer_vit.py:cifar100,sam --workdir /tmp/nu/tr_c100_sam
    python -m nonuniform_jax.main --config configs/transfer_vit.py:food101,asam --workdir /tmp/nu/tr_food_asam
    python -m nonuniform_jax.main --config configs/transfer_vit.py:cifar100,csam,laptop --workdir /tmp/nu/tr_c100_csam_laptop
    python -m nonuniform_jax.main --config configs/transfer_vit.py:food101,csam,laptop --workdir /tmp/nu/tr_food_csam_laptop

The weights: the AugReg ViT-S/16 pretrained on ImageNet-21k (Steiner et al. 2021, the checkpoint
big_vision recommends for transfer), read from
``weights/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz`` under the directory
the command runs from; download it from
https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz
or point ``--config.model.pretrained`` at any ViT-S/16 in the AugReg or big_vision layout
(``models/pretrained.py``); ``--config.model.pretrained=''`` trains from scratch instead. The
classifier is new (100 or 101 classes); the patch embedding is re-expressed for the datasets'
normalisation. A missing or unfitting file stops the run before it writes anything.

The paper's settings: learning rate 1e-3, batch 128, 20 epochs; CSAM ρ1 = ρ2 = 0.1, α = 0.4
(identity metric). The paper states no others; ours, from the ViT fine-tuning of Dosovitskiy et
al. (2021) and the authors' base optimizer: SGD with momentum 0.9, 500 warm-up steps then cosine
decay, gradient clipping at global norm 1, no weight decay, no label smoothing, no dropout; SAM
ρ = 0.1 (the authors' CIFAR-100 value), ASAM ρ = 1.0 with η = 0 (their reported baseline).
CIFAR-100: random crop 32 with 4-pixel padding and flip, then resized to 224 px on the device
(``model.resize``); Food-101: Inception crop and flip at 224 px. Needs prepared data:
``tfds build cifar100`` or ``tfds build food101``. Methods: ``csam``, ``sam``, ``asam`` and
``sgd`` (the base alone).

``laptop``: ViT-Ti/16 (AugReg ImageNet-21k,
``weights/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz``) at 64 px, its
position embeddings resized from 14×14 to 4×4, batch 32, no warm-up; CIFAR-100: 200 steps on a
fixed 5000-example subset, Food-101: 100 steps on 3200 images drawn by the seed. A CSAM step
(three gradients) took 0.4 times as long as a step of ``cifar10_resnet20.py:laptop`` on this
project's shared 2-core CPU.
"""

import pathlib
import runpy

import ml_collections

HERE = pathlib.Path(__file__).resolve().parent
# Config files are loaded by path, not as a package: load the sibling files the same way.
cifar = runpy.run_path(str(HERE / "cifar10_resnet20.py"))
imagenet = runpy.run_path(str(HERE / "imagenet_resnet50.py"))

DATASETS = ("cifar100", "food101")
METHODS = ("csam", "sam", "asam", "sgd")
WEIGHTS = {
    "vit_small": "weights/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz",
    "vit_tiny": "weights/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz",
}


def get_config(variant: str = "cifar100,csam") -> ml_collections.ConfigDict:
  tokens = [t for t in variant.split(",") if t]
  laptop = "laptop" in tokens
  tokens = [t for t in tokens if t != "laptop"]
  if len(tokens) != 2 or tokens[0] not in DATASETS or tokens[1] not in METHODS:
    raise ValueError(f"config string {variant!r} must be DATASET,METHOD[,laptop] with DATASET in "
                     f"{list(DATASETS)} and METHOD in {list(METHODS)}")
  dataset, method = tokens
  name = "vit_tiny" if laptop else "vit_small"
  side = 64 if laptop else 224
  model = {"name": name, "pretrained": WEIGHTS[name]}
  base = cifar["default"]["get_config"]()
  if dataset == "cifar100":
    c = cifar["cifar"](base, "cifar100", {**model, "resize": side})
    c = cifar["laptop"](c) if laptop else c
  else:
    c = imagenet["large_images"](base, "food101", 75_750, 128, model)
    c = imagenet["laptop"](c, model) if laptop else c
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 0 if laptop else 500
  c.label_smoothing = 0.0
  c.batch_size = 32 if laptop else 128
  if not laptop:
    c.num_steps, c.num_epochs = 0, 20.0
    c.eval_every = c.checkpoint_every = 1000
    c.log_every = 100
  if method == "sam":
    c.optimizer.name, c.sam.rho = "sam", 0.1
  elif method == "asam":
    c.optimizer.name, c.sam.rho, c.sam.eta = "asam", 1.0, 0.0
  elif method == "csam":
    c.optimizer.name = "csam"
    c.csam.rho1, c.csam.rho2, c.csam.alpha, c.csam.metric = 0.1, 0.1, 0.4, "identity"
  return c
