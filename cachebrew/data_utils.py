"""TextBrewer's module name for text augmentation: `cachebrew.augment` under the name TextBrewer scripts import."""
from .augment import AUGMENTATIONS, deleting, long_disorder, masking, n_gram_sampling, short_disorder

__all__ = ["AUGMENTATIONS", "deleting", "long_disorder", "masking", "n_gram_sampling", "short_disorder"]
