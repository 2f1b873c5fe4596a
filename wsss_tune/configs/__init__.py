"""Built-in pipeline configs (``synth``, ``voc``) shipped as package data; see :func:`wsss_tune.config.builtin_configs`."""
