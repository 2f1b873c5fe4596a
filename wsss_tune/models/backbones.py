"""Imports every module that registers a backbone (see :mod:`wsss_tune.models.registry`)."""

from wsss_tune.models import resnet38, resnet_dilated, tiny  # noqa: F401
