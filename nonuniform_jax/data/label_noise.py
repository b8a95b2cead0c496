"""Label noise on the training set (docs/experiments.md, Label noise): symmetric and asymmetric.

* ``symmetric(rate)``: exactly ``round(rate · N)`` training examples, chosen by the seed, get a
  label drawn uniformly from all ``K`` classes. The draw MAY equal the true label (the
  convention of Zhang et al. 2017, "a uniformly random class"), so the expected fraction of
  wrong labels is ``rate · (K − 1) / K``; ``noisy`` marks only the labels that actually changed.
* ``asymmetric(rate)`` (Patrini et al. 2017): in every class ``c`` that has a target ``t(c) ≠ c``,
  exactly ``round(rate · N_c)`` examples chosen by the seed are relabelled ``t(c)``.
  CIFAR-10: truck→automobile, bird→airplane, deer→horse, cat↔dog. CIFAR-100: each class to the
  next class (by label index, cyclically) of its true superclass (this project's definition);
  Patrini et al.'s public code flips within blocks of five consecutive label indices instead,
  so CIFAR-100 numbers are not directly comparable with theirs.

Noise depends only on (labels, kind, rate, seed): the same seed gives the same noisy labels.
Test labels are never touched.
"""

from typing import NamedTuple

import numpy as np
from etils import epath

from nonuniform_jax import checks
from nonuniform_jax.data import pipeline

NOISE_KINDS = ("none", "symmetric", "asymmetric")

# CIFAR-10 labels: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse,
# 8 ship, 9 truck.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# CIFAR-100 fine labels (their index is the label) and the 20 superclasses (the coarse label is
# the index in this list), from the dataset's description (Krizhevsky 2009).
CIFAR100_FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus "
    "butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch "
    "crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo "
    "keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse "
    "mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate "
    "poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone "
    "television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman "
    "worm").split()
CIFAR100_SUPERCLASSES = (
    ("aquatic_mammals", "beaver dolphin otter seal whale"),
    ("fish", "aquarium_fish flatfish ray shark trout"),
    ("flowers", "orchid poppy rose sunflower tulip"),
    ("food_containers", "bottle bowl can cup plate"),
    ("fruit_and_vegetables", "apple mushroom orange pear sweet_pepper"),
    ("household_electrical_devices", "clock keyboard lamp telephone television"),
    ("household_furniture", "bed chair couch table wardrobe"),
    ("insects", "bee beetle butterfly caterpillar cockroach"),
    ("large_carnivores", "bear leopard lion tiger wolf"),
    ("large_man-made_outdoor_things", "bridge castle house road skyscraper"),
    ("large_natural_outdoor_scenes", "cloud forest mountain plain sea"),
    ("large_omnivores_and_herbivores", "camel cattle chimpanzee elephant kangaroo"),
    ("medium_mammals", "fox porcupine possum raccoon skunk"),
    ("non-insect_invertebrates", "crab lobster snail spider worm"),
    ("people", "baby boy girl man woman"),
    ("reptiles", "crocodile dinosaur lizard snake turtle"),
    ("small_mammals", "hamster mouse rabbit shrew squirrel"),
    ("trees", "maple_tree oak_tree palm_tree pine_tree willow_tree"),
    ("vehicles_1", "bicycle bus motorcycle pickup_truck train"),
    ("vehicles_2", "lawn_mower rocket streetcar tank tractor"),
)
# fine label -> coarse label, [100] int.
CIFAR100_COARSE = np.zeros(100, np.int32)
for _coarse, (_, _members) in enumerate(CIFAR100_SUPERCLASSES):
  CIFAR100_COARSE[[CIFAR100_FINE_NAMES.index(m) for m in _members.split()]] = _coarse
CIFAR100_COARSE.flags.writeable = False


def asymmetric_targets(dataset: str) -> np.ndarray:
  """[K] the class each class is flipped to by asymmetric noise (itself where none)."""
  if dataset == "cifar10":
    targets = np.arange(10)
    targets[list(CIFAR10_ASYMMETRIC)] = list(CIFAR10_ASYMMETRIC.values())
    return targets
  if dataset == "cifar100":
    targets = np.arange(100)
    for coarse in range(20):
      members = np.flatnonzero(CIFAR100_COARSE == coarse)
      targets[members] = np.roll(members, -1)
    return targets
  raise ValueError(f"asymmetric label noise is defined for cifar10 and cifar100, not {dataset!r}")


class LabelNoise(NamedTuple):
  """Noisy training labels [N] int32, ``noisy`` [N] bool (label changed), and a JSON summary."""
  labels: np.ndarray
  noisy: np.ndarray
  summary: dict


def apply(labels: np.ndarray, *, kind: str, rate: float, num_classes: int, seed: int,
          dataset: str) -> LabelNoise:
  """Applies label noise of ``kind`` ('none', 'symmetric', 'asymmetric') at ``rate`` to labels."""
  checks.choice("label_noise", kind, NOISE_KINDS)
  labels = np.asarray(labels, np.int32)
  gen = pipeline.rng(seed, pipeline.STREAM_LABEL_NOISE)
  noisy_labels = labels.copy()
  if kind == "symmetric":
    chosen = gen.permutation(len(labels))[:round(rate * len(labels))]
    noisy_labels[chosen] = gen.integers(0, num_classes, len(chosen))
    selected = len(chosen)
  elif kind == "asymmetric":
    targets = asymmetric_targets(dataset)
    selected = 0
    for c in np.flatnonzero(targets != np.arange(num_classes)):
      members = np.flatnonzero(labels == c)
      chosen = gen.permutation(members)[:round(rate * len(members))]
      noisy_labels[chosen] = targets[c]
      selected += len(chosen)
  else:   # 'none'
    selected = 0
  noisy = noisy_labels != labels
  summary = {"kind": kind, "rate": float(rate), "num_selected": int(selected),
             "num_flipped": int(noisy.sum()), "flipped_fraction": float(noisy.mean()),
             "draw_may_equal_true_label": kind == "symmetric"}
  return LabelNoise(noisy_labels, noisy, summary)


def write(noise: LabelNoise, clean_labels: np.ndarray, train_indices: np.ndarray,
          workdir: str) -> str:
  """Saves ``label_noise.npz`` in workdir (a local path or a bucket) and returns its path.

  Arrays: ``noisy_labels`` and ``clean_labels`` [N] (in training-set order), ``flipped_indices``
  (positions in the training set whose label changed), ``train_indices`` [N] (position of each
  training example in the dataset's full training split, for a subset).
  """
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  path = root / "label_noise.npz"
  tmp = root / "label_noise.npz.tmp"   # written whole, then renamed: never half a file
  with tmp.open("wb") as f:
    np.savez(f, noisy_labels=noise.labels, clean_labels=np.asarray(clean_labels, np.int32),
             flipped_indices=np.flatnonzero(noise.noisy), train_indices=train_indices)
  tmp.replace(path)
  return str(path)
