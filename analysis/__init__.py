"""Analysis tools for vit-gka: FLOP tables (``python -m analysis.flops``) and sweep reports
(``python -m analysis.report``)."""
