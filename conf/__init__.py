"""Hydra's configs of training (config.yaml) and evaluation (eval.yaml), one config group per folder. This folder
installs as the package ``vit_gka.conf`` (pyproject's package-dir), which Hydra reads as ``pkg://vit_gka.conf``
installed or not; ``vit_gka.cli.CONF_DIR`` is its path."""
