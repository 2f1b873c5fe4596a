"""The data layer: VOC-format reader and datasets, joint transforms, synthetic data, validation."""

from __future__ import annotations

from wsss_tune.data.check import Problem, check_dataset, format_problems
from wsss_tune.data.masks import encode_mask_png, read_mask_png, save_mask_png
from wsss_tune.data.palette import colorize, voc_palette
from wsss_tune.data.synth import SYNTH_CLASSES, SYNTH_PRESETS, generate_synthetic_voc
from wsss_tune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainTransform, normalize_image, to_tensors
from wsss_tune.data.voc import (
    IGNORE_INDEX,
    LABEL_SOURCES,
    PROBLEM_KINDS,
    VOC_CLASSES,
    ClassificationDataset,
    DataError,
    ImageDataset,
    SampleTransform,
    SegmentationDataset,
    VOCLayout,
    collate_raw,
)

__all__ = [
    "VOC_CLASSES",
    "IGNORE_INDEX",
    "LABEL_SOURCES",
    "PROBLEM_KINDS",
    "DataError",
    "VOCLayout",
    "SampleTransform",
    "ClassificationDataset",
    "SegmentationDataset",
    "ImageDataset",
    "collate_raw",
    "save_mask_png",
    "read_mask_png",
    "encode_mask_png",
    "voc_palette",
    "colorize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalize_image",
    "to_tensors",
    "TrainTransform",
    "SYNTH_PRESETS",
    "SYNTH_CLASSES",
    "generate_synthetic_voc",
    "Problem",
    "check_dataset",
    "format_problems",
]
