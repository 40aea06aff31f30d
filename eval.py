"""Evaluate a trained model, or benchmark it against its baseline: ``python eval.py [overrides]``, the same as
the ``vit-gka-eval`` command. The command is ``vit_gka/eval_main.py``, the evaluation ``vit_gka/evaluate.py``, the
config ``conf/eval.yaml``."""
from vit_gka.eval_main import cli

if __name__ == '__main__':
    cli()
