"""Whether to trust a study or a fit: design checks before training, backtests that
hold out the largest runs, and sensitivity to pinned parameters.
"""
