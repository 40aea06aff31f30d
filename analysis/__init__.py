"""The report over run folders: a sweep's summary table (``summary``), the paper's Tables 2 and 4 (``tables``),
seed statistics (``seeds``), runtimes (``runtime``), plots (``plots``) and the report that gathers them (``report``,
Hydra's end-of-sweep callback). This folder sits at the top of the repository and installs as ``vit_gka.analysis``
(pyproject's package-dir); it reads the package, and nothing in ``vit_gka/`` imports it."""
