"""The run's trackers (``log_with``: Accelerate's TensorBoard, W&B, MLflow, ...), named so that the runs of a sweep
compare side by side.

* The project (W&B project, MLflow experiment, Comet project, ...) is ``tracker.project``, else the sweep's folder
  name in a ``-m`` sweep, else ``vit-gka``: every job of a sweep lands in one project.
* Each run is named after its job: ``<model>_<shape>`` and the overrides it was given (``gka_fmnist lr=0.004``).
* TensorBoard keeps its folder ``<run>/tb``. Its hparams view gets the run's configuration together with the final
  top-1, EMA top-1 and loss, written when the run ends (``<run>/tb/hparams``), so that the runs of a sweep can be
  sorted by accuracy there; Accelerate's own tracker writes the configuration at the start with no metric.
"""
import os
from typing import Any, Dict, List, Tuple

import yaml
from accelerate.tracking import TensorBoardTracker, on_main_process
from omegaconf import DictConfig

__all__ = ['HparamsAtEnd', 'names', 'start_trackers', 'finish_trackers', 'TB_FOLDER', 'HPARAMS_FOLDER']

TB_FOLDER = 'tb'  # <run>/tb: the TensorBoard events
HPARAMS_FOLDER = 'hparams'  # <run>/tb/hparams: the hparams view's session, with the final metrics
DEFAULT_PROJECT = 'vit-gka'
_NAMED_BY = ('model', 'shape')  # overrides the run's name already says (<model>_<shape>)
_INIT_KWARGS = {'wandb': 'name', 'mlflow': 'run_name'}  # tracker -> the keyword of its run name


class HparamsAtEnd(TensorBoardTracker):
    """Accelerate's TensorBoard tracker whose hparams session is written when the run ends, with its final metrics
    (``store_final_metrics``): TensorBoard shows a metric column only for metrics written with the session."""

    @on_main_process
    def store_init_configuration(self, values: Dict[str, Any]) -> None:
        self.hparams = values
        folder = os.path.join(self.logging_dir, HPARAMS_FOLDER)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'hparams.yml'), 'w') as f:  # the configuration as Accelerate records it
            yaml.safe_dump(values, f)

    @on_main_process
    def store_final_metrics(self, metrics: Dict[str, float]) -> None:
        self.writer.add_hparams(self.hparams, metrics, run_name=HPARAMS_FOLDER)
        self.writer.flush()


def _job_overrides() -> List[str]:
    from hydra.core.hydra_config import HydraConfig
    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task
            if o.lstrip('+~').split('=')[0] not in _NAMED_BY and not o.lstrip('+~').startswith('hydra.')]


def names(cfg: DictConfig) -> Tuple[str, str]:
    """(project, run name) of this run's trackers (module docstring)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    project = (cfg.get('tracker') or {}).get('project')
    if not project and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        project = os.path.basename(os.path.normpath(HydraConfig.get().sweep.dir))
    run = ' '.join([str(cfg.model_choice)] + _job_overrides())
    return str(project or DEFAULT_PROJECT), run


def start_trackers(accelerator, cfg: DictConfig, run_dir: str, hparams: Dict[str, Any]) -> None:
    """Start every tracker of ``accelerator.log_with`` for the run in ``run_dir``, under the project and the run
    name of ``names``, with the run's configuration ``hparams``."""
    project, run = names(cfg)
    accelerator.project_configuration.set_directories(run_dir)
    accelerator.log_with = [HparamsAtEnd(TB_FOLDER, run_dir) if str(t) == 'tensorboard' else t
                            for t in accelerator.log_with]
    init_kwargs = {name: {key: run} for name, key in _INIT_KWARGS.items()}
    init_kwargs['wandb']['dir'] = run_dir  # W&B's files in the run folder, as TensorBoard's
    accelerator.init_trackers(project, config=hparams, init_kwargs=init_kwargs)


def finish_trackers(accelerator, results: Dict[str, Any]) -> None:
    """The run's final top-1, EMA top-1 and loss (results.json) into TensorBoard's hparams view."""
    metrics = {f'hparams/{k}': float(results[k]) for k in ('top1', 'ema_top1', 'loss') if results.get(k) is not None}
    for tracker in accelerator.trackers:
        if isinstance(tracker, HparamsAtEnd):
            tracker.store_final_metrics(metrics)
