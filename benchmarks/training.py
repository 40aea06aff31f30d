"""Training speed of the whole loop against the bare step, GKA against DeiT, interleaved in one process.

    python -m benchmarks.training                                  # the quickstart: shape=fmnist, recipe=quick
    python -m benchmarks.training --steps 40 --reps 5 --profile    # + where a step's time goes
    python -m benchmarks.training -- batch_augment=false workers=1  # train.py overrides after --

Each model (``--models``, train.py's ``model=`` names) is built exactly as train.py builds it
(``job.build_parts``: data set, loaders, model, optimizer, schedule, EMA, compilation), then the models take turns,
round by round, in two ways:

* bare step: forward, loss, backward and the optimizer step on one fixed batch (no data, guard, EMA, schedule
  or logs): what the model itself costs;
* loop: ``loop.train_one_epoch`` over ``--steps`` batches of the real training loader, the run's own code
  (data, augmentation, step, non-finite guard, EMA, schedule, log lines).

Printed: images/s of each (median round), loop / bare, and GKA / DeiT for both. ``--profile``: milliseconds per
step in data, forward, backward, optimizer (clipping, guard, step), EMA and the rest, from ``torch.profiler``
over one more loop round per model (the labels ``loop.py`` sets). ``--compile``: also ``compile=true``
variants, with their compile time (the first, warm-up round). Numbers for this machine: docs/benchmarks.md.
"""
import argparse
import statistics
import time
from typing import Dict, List

import torch

from vit_gka.measure.benchmark import print_rows, ratio, write_json

LABELS = ('data', 'forward', 'backward', 'optimizer', 'ema')


def compose_run(overrides: List[str]):
    """train.py's composed config for ``overrides`` (its ``${hydra:...}`` values resolvable)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from vit_gka.errors import UserError
    from vit_gka.train.validation import validate
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module('vit_gka.conf', version_base='1.3'):
            cfg = compose('config', overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(f"{str(e).strip().splitlines()[0]} (overrides: {' '.join(overrides)})") from None
    HydraConfig.instance().set_config(cfg)
    validate(cfg)
    return cfg


class Contender:
    """One model's run parts and its two ways of training."""

    def __init__(self, label: str, overrides: List[str], steps: int, accelerator):
        from vit_gka.train.job import build_parts
        from vit_gka.train.state import TrainState
        self.label, self.steps = label, steps
        cfg = compose_run(overrides)
        cfg.train_subset = steps * int(cfg.batch_size)  # one round = one pass over these
        cfg.progress = False
        self.cfg = cfg
        self.parts, self.setup = build_parts(cfg, accelerator)
        self.batch = next(iter(self.parts.train_loader))
        self.state = TrainState(self.setup.model_name, self.setup.model_args, epochs=self.setup.num_epochs,
                                global_batch_size=self.setup.global_batch, seed=int(cfg.seed), started=time.time())
        self.epoch = 0
        self.times = {'bare': [], 'loop': []}

    def bare(self) -> float:
        parts = self.parts
        images, targets = self.batch
        start = time.perf_counter()
        for _ in range(self.steps):
            loss = parts.loss_fn(parts.model(images).float(), targets)
            parts.accelerator.backward(loss)
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            loss.item()
        return time.perf_counter() - start

    def loop(self) -> float:
        from vit_gka.data.sampling import set_loader_epoch
        from vit_gka.train.loop import train_one_epoch
        set_loader_epoch(self.parts.train_loader, self.epoch)
        self.state.step, self.state.totals = 0, None
        start = time.perf_counter()
        train_one_epoch(self.parts, self.state, self.epoch, self.parts.train_loader)
        self.epoch += 1
        return time.perf_counter() - start

    def profile(self) -> Dict[str, float]:
        """Milliseconds per step in each label of loop.py, and the rest, over one loop round."""
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            total = self.loop()
        spent = {e.key: e.cpu_time_total / 1e3 / self.steps for e in prof.key_averages() if e.key in LABELS}
        out = {label: spent.get(label, 0.0) for label in LABELS}
        out['rest'] = total * 1e3 / self.steps - sum(out.values())
        out['step'] = total * 1e3 / self.steps
        return out

    def images_per_s(self, way: str) -> float:
        return self.steps * int(self.cfg.batch_size) / statistics.median(self.times[way])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='gka,deit', help="train.py model= names, comma-separated (default gka,deit)")
    parser.add_argument('--shape', default='fmnist', help='train.py shape= (default fmnist, the quickstart)')
    parser.add_argument('--steps', type=int, default=30, help='steps per round (default 30)')
    parser.add_argument('--reps', type=int, default=5, help='timed rounds per model and way (default 5)')
    parser.add_argument('--compile', action='store_true', help='also each model with compile=true')
    parser.add_argument('--profile', action='store_true', help='ms per step in data, forward, backward, ...')
    parser.add_argument('--out', default=None, help='also write the numbers to this JSON file')
    parser.add_argument('overrides', nargs='*', help='train.py overrides for every model (after --)')
    args = parser.parse_args(argv)
    from vit_gka.errors import UserError, fail
    from vit_gka.train.distributed import make_accelerator

    names = [m for m in args.models.split(',') if m]
    variants = [(m, []) for m in names] + ([(m + '+compile', ['compile=true']) for m in names] if args.compile else [])
    base = [f'shape={args.shape}', 'cpu=true', 'log_with=none', *args.overrides]
    try:
        accelerator = make_accelerator(compose_run(base))
        contenders = [Contender(label, base + [f"model={label.split('+')[0]}", *extra], args.steps, accelerator)
                      for label, extra in variants]
    except UserError as e:
        fail(str(e))
    first = {}
    for c in contenders:  # warm-up (and compilation): one untimed round of each way
        first[c.label] = c.bare() + c.loop()
    for _ in range(args.reps):
        for c in contenders:
            c.times['bare'].append(c.bare())
            c.times['loop'].append(c.loop())
    rows = []
    for c in contenders:  # against DeiT of the same variant (eager / compiled)
        base_c = next((b for b in contenders if b.label == 'deit' + c.label.partition('+')[1] + c.label.partition('+')[2]),
                      None)
        rows.append({'model': c.label, 'bare img/s': round(c.images_per_s('bare')),
                     'loop img/s': round(c.images_per_s('loop')),
                     'loop / bare': ratio(c.images_per_s('loop'), c.images_per_s('bare')),
                     'bare vs DeiT': ratio(c.images_per_s('bare'), base_c.images_per_s('bare')) if base_c else None,
                     'loop vs DeiT': ratio(c.images_per_s('loop'), base_c.images_per_s('loop')) if base_c else None,
                     'first round s': round(first[c.label], 1)})
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch {contenders[0].cfg.batch_size}, '
          f'{args.steps} steps x {args.reps} interleaved rounds, overrides: {" ".join(base)}')
    print_rows(rows, 'Training images/s: the whole loop (train_one_epoch) vs the bare step')
    profiles = {}
    if args.profile:
        profiles = {c.label: c.profile() for c in contenders}
        print_rows([{'model': label, **{k: round(v, 2) for k, v in p.items()}} for label, p in profiles.items()],
                   'Milliseconds per step (torch.profiler, one loop round)')
    write_json(args.out, vars(args), rows=rows, profiles=profiles)


if __name__ == '__main__':
    main()
