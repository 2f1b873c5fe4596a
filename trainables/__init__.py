"""Ray Tune trainables: flat config dict -> typed stage configs -> stage runner -> tune.report."""
