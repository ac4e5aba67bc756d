"""From a sweep in the store to stored fits: selecting curves, the final, per-token
and learning-curve fits, critical batch size, IsoFLOP profiles and CSV files, each
fit recorded with its provenance and warnings.
"""
