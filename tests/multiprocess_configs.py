"""Small configs of the multi-process tests (``tests/test_multiprocess.py``), run through the
command line in one process and in several:

    --config tests/multiprocess_configs.py:bn        SAM on a BatchNorm CNN (one 8-channel
                                                     convolution-BatchNorm-ReLU stage), digits
    --config tests/multiprocess_configs.py:food101   an MLP on Food-101 at 16 px, streamed
                                                     (--config.data_dir: a prepared copy)
"""

import pathlib
import runpy

import ml_collections

default = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "configs" /
                             "default.py"))


def get_config(variant: str) -> ml_collections.ConfigDict:
  c = default["get_config"]()
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 8, 2, 4, 4
  c.progress = False
  if variant == "bn":
    c.dataset = "digits"
    c.optimizer.name, c.sam.rho = "sam", 0.1
    c.model = ml_collections.ConfigDict({"name": "vgg16_bn", "stages": ((8,),)})
  elif variant == "food101":
    c.dataset, c.image_size = "food101", 16
    c.batch_size, c.eval_batch_size, c.train_eval_examples = 16, 16, 16
    c.model.widths = (32,)
  else:
    raise ValueError(f"unknown variant {variant!r}; choose 'bn' or 'food101'")
  return c
