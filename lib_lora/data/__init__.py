"""The dataset layer: folder scan, image loading and bucketing, captions, epoch batches, latent cache.

Functions take plain typed arguments; the training config is turned into them by the trainer's
factory (this package never imports it). Behaviour follows kohya-ss/sd-scripts where it defines it.
"""
from .batches import Sample, StepMath, bucket_counts, bucket_info, check_batch_size, epoch_samples, make_batches, step_math
from .buckets import BucketChoice, assign_bucket, check_resolution, cover_size, make_buckets, select_bucket
from .cache import LatentCache
from .captions import build_caption, split_tags
from .errors import DatasetError
from .folders import DatasetScan, ImageItem, Subset, scan_dataset
from .images import fit_to_bucket, fit_with_mask, image_to_tensor, load_image, should_flip
from .split import as_validation, split_validation

__all__ = [
    "DatasetError", "ImageItem", "Subset", "DatasetScan", "scan_dataset",
    "load_image", "fit_to_bucket", "fit_with_mask", "image_to_tensor", "should_flip",
    "make_buckets", "assign_bucket", "select_bucket", "BucketChoice", "check_resolution", "cover_size",
    "build_caption", "split_tags",
    "Sample", "StepMath", "epoch_samples", "make_batches", "step_math", "check_batch_size", "bucket_counts", "bucket_info",
    "LatentCache", "split_validation", "as_validation",
]
