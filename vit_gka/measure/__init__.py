"""What training and evaluation measure of a model: parameters and FLOPs (fvcore, ``flops``), attention
statistics (``attention``), the interleaved timing harness (``benchmark``) and the tables they are written as
(``tables``). The report over run folders is the top-level ``analysis/`` (``vit_gka.analysis``), which reads these;
nothing here reads it."""
