"""wsss_tune.ops"""
