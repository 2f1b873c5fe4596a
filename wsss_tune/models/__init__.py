"""wsss_tune.models"""
