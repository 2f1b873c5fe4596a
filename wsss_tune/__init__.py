"""wsss-tune: hyperparameter search for weakly supervised semantic segmentation.

The library (``ops``, ``models``, ``data``, ``stages``) knows nothing of Ray Tune; ``wsss_tune.trainables``
and ``wsss_tune.analysis`` (installed from the repository's ``trainables/`` and ``analysis/``) build on it.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
