"""The offline default: an MLP on MNIST-1D trained with SGD (about 30 s on a 2-core CPU).

    python -m nonuniform_jax.main --config configs/default.py --workdir /tmp/nu/default

Every other config imports this one and overrides what differs, so this file is also the list
of every setting; overrides on the command line look like ``--config.optimizer.learning_rate=0.05``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # What runs: 'train' (a training run); the small studies have their own tasks and configs.
  c.task = "train"
  c.seed = 0                       # initialisation, dropout and, unless data_seed is set, data
  c.data_seed = -1                 # >= 0: the data alone (subsets, label noise, batch order)

  # Data. Offline: 'mnist1d', 'digits'. TFDS: 'mnist', 'fashion_mnist', 'cifar10', 'cifar100',
  # 'imagenet2012', 'food101' (prepared data under data_dir or $TFDS_DATA_DIR).
  c.dataset = "mnist1d"
  c.data_dir = ""
  c.augment = True                 # standard augmentation of the dataset (none for MNIST-like)
  c.image_size = 224               # ImageNet / Food-101 crops
  c.num_train_examples = 0         # > 0: a fixed, seeded subset of the training set
  c.train_eval_examples = 4000     # fixed training subset (no augmentation) for train-side metrics
  c.label_noise = ml_collections.ConfigDict({"kind": "none", "rate": 0.0})  # none|symmetric|asymmetric

  # Model: 'name' picks it from nonuniform_jax.models.MODELS; other keys are its arguments.
  c.model = ml_collections.ConfigDict({"name": "mlp", "widths": (256, 256), "activation": "relu"})

  # Optimizer. name: sgd | adam | adamw | sam | asam | csam (= nonuniform_sam) | gam | sam_gcm | cov.
  # The SAM family wraps the base optimizer named by `base` (sgd | adam | adamw).
  c.optimizer = ml_collections.ConfigDict({
      "name": "sgd",
      "base": "sgd",
      "learning_rate": 0.1,
      "momentum": 0.9,
      "nesterov": False,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "weight_decay": 0.0,
      "weight_decay_mode": "coupled",   # coupled (L2 added to the gradient) | decoupled (AdamW-style)
      "grad_clip_norm": 0.0,            # > 0: clip the update's global norm
  })
  c.schedule = ml_collections.ConfigDict({
      "name": "cosine",                 # constant | cosine | step | linear
      "warmup_steps": 0,
      "step_boundaries": (0.5, 0.75),   # 'step': fractions of training where the rate is multiplied
      "step_factor": 0.1,
      "end_factor": 0.0,                # cosine / linear: final rate as a fraction of the peak
  })
  # SAM family settings (used when optimizer.name is in the family).
  c.sam = ml_collections.ConfigDict({
      "rho": 0.05,
      "m": 0,                           # examples per perturbation group; 0 = the whole batch
      "eta": 0.0,                       # ASAM's η
      "bn_policy": "clean",             # clean (running stats from the clean pass) | every_pass
      "weight_decay_in_perturbation": False,
  })
  # CSAM / NonuniformSAM (optimizer.name 'csam' or 'nonuniform_sam'): docs/methods.md, CSAM.
  c.csam = ml_collections.ConfigDict({
      "rho1": 0.1,
      "rho2": 0.2,
      "alpha": 0.9,
      "metric": "identity",             # identity | adaptive | kfac
      "momentum_sign": -1,              # -1: d = δ − m; +1: δ + m (the authors' K-FAC class)
  })
  # Kronecker factors (CSAM's 'kfac' metric and GAM, whose radius is sam.rho).
  c.kfac = ml_collections.ConfigDict({
      "damping": 1e-3,
      "stats_every": 50,
      "inverse_every": 50,
      "ema_decay": 0.95,
      "unfactored": "zero",             # parameters without factors: zero (unperturbed) | identity
      "init": "identity",               # running factors start at: identity | batch (raw first factors)
      "inverse": "exact",               # damped inverse: exact (eigenbasis) | factored (Tikhonov)
  })
  c.sam_gcm = ml_collections.ConfigDict({"rho": 5e-4, "xi": 1e-6, "max_params": 1_000_000})
  c.cov = ml_collections.ConfigDict({"lam": 0.3})
  c.label_smoothing = 0.0
  # Training and evaluation passes in float32 or bfloat16 (activations and matrix products;
  # parameters, optimizer state, loss and BatchNorm statistics stay float32; measures always
  # run in float32).
  c.precision = "float32"
  # Devices: the batch is split over every device of every process (data parallelism).
  c.parallel = ml_collections.ConfigDict({
      "bn_sync": True,        # BatchNorm statistics over the global batch (False: per device)
      "fully_sharded": False,  # shard parameters and optimizer state over devices as well
      "num_devices": 0,        # 0: every device; n: the first n (one process only)
  })

  # Sharpness and nonuniformity measures, computed every `every_steps` (0: only at the end) on
  # the first `num_examples` of the fixed training subset, with BatchNorm in `bn_mode`
  # ('running' averages or each 'batch''s own statistics). Names: nonuniform_jax.evaluators.
  c.measures = ml_collections.ConfigDict({
      "names": (),
      "every_steps": 0,
      "num_examples": 1024,
      "batch_size": 256,
      "bn_mode": "running",
      "seed": 0,
      "settings": {
          "lambda_max": {"num_iters": 100, "tol": 1e-3},
          "top_eigenvalues": {"k": 5, "num_iters": 100, "tol": 1e-3},
          "hessian_trace": {"num_probes": 100},
          "hessian_esd": {"num_iters": 50, "num_probes": 5},
          "sam_sharpness": {"rho": 0.05},
          "worst_case_sharpness": {"rho": 0.05, "p": 2, "adaptive": False},
          "average_sharpness": {"rho": 0.05, "adaptive": False},
          "pacbayes_flatness": {"target": 0.1, "magnitude_aware": False},
          # 'chunked', not 'auto': on Dense/Conv models 'auto' takes the fast exact path (tr Σ from
          # one backward pass), which lacks the per-coordinate statistics (adaptive tr Σ, GSNR)
          # the standard set should log. Set method='auto' for speed.
          "gradient_noise": {"chunk_size": 64, "method": "chunked"},
          "batch_gradient_noise": {"batch_size": 0},   # 0: the training batch size
          "wu_nonuniformity": {"num_iters": 100},
          "kfac_structure": {},
          "diagnostics": {},
      },
  })
  c.measure_nonuniformity = False    # adds the standard nonuniformity set to measures.names

  c.batch_size = 128                # global batch, split over devices
  c.eval_batch_size = 1000
  c.num_steps = 3000                # > 0 wins; else num_epochs decides
  c.num_epochs = 0.0
  c.eval_every = 500
  c.log_every = 100
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.progress = True
  c.overwrite = False               # True: wipe a workdir holding a run of a different config
  return c
