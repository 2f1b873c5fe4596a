"""wsss_tune.stages"""
