"""Throughput and memory benchmark in the manner of timm's benchmark.py, GKA and its baseline interleaved.

For each model: inference (no_grad forward) and training steps (forward, cross-entropy, backward, AdamW
step) on random inputs of the model's own size, ``warmup`` untimed then ``steps`` timed steps, bf16
autocast on CUDA. The models take turns round by round in one process (so clock and thermal drift hit both
alike) and the median round is reported. Peak memory: ``torch.cuda.max_memory_allocated`` per phase
(CUDA only; ``None`` on the CPU, where PyTorch keeps no allocator peak).
"""
import statistics
import time
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from vit_gka.errors import UserError

PREFIXES = ('gka_', 'vlt_', 'eka_fixed_', 'eka_adaptive_', 'bka_fixed_', 'bka_adaptive_', 'tka_fixed_', 'tka_adaptive_')
ATTN_ONLY_ARGS = ('impl', 'window', 'window_2d', 'sigma_init')


def baseline_name(name: str) -> Optional[str]:
    """deit_small_patch16_224 for gka_deit_small_patch16_224 (any registered projection-free prefix)."""
    import timm
    for prefix in PREFIXES:
        if name.startswith(prefix) and timm.is_model(name[len(prefix):]):
            return name[len(prefix):]
    return None


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == 'cuda' else None


def _reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Bench:
    """One model under test: its inputs, optimizer and the per-round timings."""

    def __init__(self, label: str, name: str, args: Dict[str, Any], device, batch_size: int, amp: bool):
        import timm

        import vit_gka  # noqa: F401
        self.label, self.name, self.device, self.batch_size = label, name, device, batch_size
        self.model = timm.create_model(name, **args).to(device)
        self.input_size = tuple(self.model.pretrained_cfg['input_size'])
        embed = getattr(self.model, 'patch_embed', None)
        if embed is not None:
            self.input_size = (embed.proj.in_channels, *embed.img_size)
        self.x = torch.randn(batch_size, *self.input_size, device=device)
        self.y = torch.randint(0, self.model.num_classes, (batch_size,), device=device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
        self.times = {'infer': [], 'train': []}
        self.peak = {'infer': None, 'train': None}

    def _infer_step(self) -> None:
        with torch.no_grad(), self.autocast:
            self.model(self.x)

    def _train_step(self) -> None:
        with self.autocast:
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run(self, phase: str, warmup: int, steps: int) -> None:
        self.model.train(phase == 'train')
        step = self._train_step if phase == 'train' else self._infer_step
        _reset_peak(self.device)
        for _ in range(warmup):
            step()
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(self.device)
        self.times[phase].append(time.perf_counter() - start)
        peak = _peak_mb(self.device)
        self.peak[phase] = peak if self.peak[phase] is None else max(self.peak[phase], peak)

    def rate(self, phase: str, steps: int) -> Optional[float]:
        times = self.times[phase]
        return self.batch_size * steps / statistics.median(times) if times else None


def _models(cfg: DictConfig, run_dir: Optional[str]) -> List[Dict[str, Any]]:
    """[model under test, its baseline]: names and create_model arguments."""
    import timm

    import vit_gka  # noqa: F401
    if run_dir is not None:
        from vit_gka.evaluate import run_results
        res = run_results(run_dir)
        name, args, label = res['model'], dict(res['model_args']), res.get('model_config') or res['model']
    else:
        name, args, label = cfg.model_name, OmegaConf.to_container(cfg.model_args, resolve=True) if cfg.model_args else {}, cfg.model_name
        if not timm.is_model(name):
            raise UserError(f"unknown timm model '{name}'")
    args.pop('drop_path_rate', None)
    models = [{'label': label, 'name': name, 'args': args}]
    base = cfg.bench_cfg.baseline
    base = baseline_name(name) if base == 'auto' else base
    if base:
        if not timm.is_model(base):
            raise UserError(f"unknown baseline model '{base}' (bench_cfg.baseline)")
        base_args = {k: v for k, v in args.items() if k not in ATTN_ONLY_ARGS}
        models.append({'label': f'{base} (same shape)' if base != name else f'{base} (baseline)',
                       'name': base, 'args': base_args})
    return models


def run_benchmark(cfg: DictConfig, run_dir: Optional[str], data_cfg=None) -> List[Dict[str, Any]]:
    """Benchmark rows (see the module docstring), the model first, then its baseline with ratios."""
    bc = cfg.bench_cfg
    device = torch.device('cuda' if torch.cuda.is_available() and not cfg.cpu else 'cpu')
    amp = device.type == 'cuda' if str(bc.amp) == 'auto' else bool(bc.amp)
    warmup, steps, rounds = int(bc.warmup), int(bc.steps), int(bc.rounds)
    if steps <= 0 or rounds <= 0 or warmup < 0:
        raise UserError('bench_cfg.steps and bench_cfg.rounds must be > 0, bench_cfg.warmup >= 0')
    benches = [Bench(m['label'], m['name'], m['args'], device, int(bc.batch_size), amp) for m in _models(cfg, run_dir)]
    phases = ['infer', 'train'] if bc.train else ['infer']
    for _ in range(rounds):
        for phase in phases:
            for b in benches:
                b.run(phase, warmup, steps)
    rows = []
    for b in benches:
        rows.append({
            'label': b.label, 'model': b.name, 'batch_size': b.batch_size, 'input_size': list(b.input_size),
            'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
            'dtype': 'bf16' if amp else 'fp32', 'steps': steps, 'rounds': rounds,
            'infer_images_per_s': b.rate('infer', steps), 'train_images_per_s': b.rate('train', steps),
            'infer_peak_mem_mb': b.peak['infer'], 'train_peak_mem_mb': b.peak['train'],
            'baseline': benches[1].label if len(benches) > 1 and b is benches[0] else None,
        })
    if len(rows) > 1:
        for key in ('infer_images_per_s', 'train_images_per_s', 'infer_peak_mem_mb', 'train_peak_mem_mb'):
            a, base = rows[0][key], rows[1][key]
            rows[0][f'ratio_{key}'] = a / base if a is not None and base else None
    _print(rows)
    return rows


def _print(rows: List[Dict[str, Any]]) -> None:
    from tabulate import tabulate
    cols = [('label', 'model'), ('dtype', 'dtype'), ('batch_size', 'batch'), ('infer_images_per_s', 'inference img/s'),
            ('train_images_per_s', 'training img/s'), ('infer_peak_mem_mb', 'inference peak MB'),
            ('train_peak_mem_mb', 'training peak MB')]
    fmt = (lambda v: '-' if v is None else f'{v:.0f}' if isinstance(v, float) else str(v))
    print(tabulate([[fmt(r[k]) for k, _ in cols] for r in rows], headers=[h for _, h in cols], tablefmt='github',
                   disable_numparse=True))
    if len(rows) > 1:
        r = rows[0]
        parts = [f"{what} x{r[f'ratio_{key}']:.2f}" for key, what in (
            ('infer_images_per_s', 'inference speed'), ('train_images_per_s', 'training speed'),
            ('train_peak_mem_mb', 'training memory')) if r.get(f'ratio_{key}') is not None]
        print(f"{rows[0]['label']} / {rows[1]['label']} ({rows[0]['device']}): " + ', '.join(parts), flush=True)
