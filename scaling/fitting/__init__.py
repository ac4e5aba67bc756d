"""Fitting laws to curves: the law registry, input checks, the batched BFGS
minimizer, variable projection and the jitted fitter. JAX and numpy only; no store.
"""
