"""Hydra configs of training (config.yaml) and evaluation (eval.yaml); a package so Hydra finds them installed."""
