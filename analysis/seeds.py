"""Several seeds of one configuration: mean +- standard deviation of top-1, and the change against the baseline as
a mean difference with a 95% interval, paired by seed where both sides ran the same seeds (the seed fixes the data
order and the augmentation, so paired differences cancel their share of the noise), else Welch's interval.

``groups(rows, key)`` works on results.json dicts (the sweep table) and on the report's rows (which add the
baseline pairing); ``compare(runs, baseline_runs)`` is the interval. scipy gives Student's t quantiles.
"""
import math
import statistics
from typing import Callable, Dict, Hashable, List, Optional

__all__ = ['config_name', 'groups', 'compare', 'mean_std']


def config_name(row: Dict) -> str:
    """The configuration a run belongs to, seeds aside: its Hydra choice (``<model>_<shape>``) or model name."""
    return row.get('model_config') or row['model']


def mean_std(values: List[float]) -> Dict[str, Optional[float]]:
    """n, mean and sample standard deviation (None for a single value)."""
    return {'n': len(values), 'mean': statistics.fmean(values),
            'std': statistics.stdev(values) if len(values) > 1 else None}


def groups(rows: List[Dict], key: Callable[[Dict], Hashable] = config_name, value: str = 'top1') -> List[Dict]:
    """One entry per ``key`` (in first-seen order): ``name`` (config_name), ``runs``, ``seeds`` and mean_std of
    ``value``. Runs of one key that share a seed differ in something else (a sweep over lr): they are not seeds of
    one configuration, and each is an entry of its own."""
    by_key: Dict[Hashable, List[Dict]] = {}
    for row in rows:
        by_key.setdefault(key(row), []).append(row)
    out = []
    for runs in by_key.values():
        seeds = [r.get('seed') for r in runs]
        for part in [runs] if len(set(seeds)) == len(seeds) else [[r] for r in runs]:
            out.append({'name': config_name(part[0]), 'runs': part, 'seeds': [r.get('seed') for r in part],
                        **mean_std([float(r[value]) for r in part])})
    return out


def _t(df: float) -> float:
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def compare(runs: List[Dict], baseline: List[Dict], value: str = 'top1') -> Dict[str, Optional[float]]:
    """``runs`` minus ``baseline`` in ``value``: mean difference, its 95% interval (None with too few runs) and
    how it was formed: 'paired' (by seed: both sides have the same seeds, n >= 2), 'Welch' (unequal variances,
    2+ runs a side) or 'single' (one run a side: no interval)."""
    mine = {r.get('seed'): float(r[value]) for r in runs}
    theirs = {r.get('seed'): float(r[value]) for r in baseline}
    diff = statistics.fmean(mine.values()) - statistics.fmean(theirs.values())
    out = {'diff': diff, 'lo': None, 'hi': None, 'pairing': 'single'}
    if set(mine) == set(theirs) and len(mine) >= 2 and None not in mine:
        d = [mine[s] - theirs[s] for s in mine]
        half = _t(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
        out.update(diff=statistics.fmean(d), lo=statistics.fmean(d) - half, hi=statistics.fmean(d) + half,
                   pairing='paired')
    elif len(mine) >= 2 and len(theirs) >= 2:
        va, vb = statistics.variance(mine.values()) / len(mine), statistics.variance(theirs.values()) / len(theirs)
        se = math.sqrt(va + vb)
        if se > 0:  # Welch-Satterthwaite degrees of freedom
            df = (va + vb) ** 2 / (va ** 2 / (len(mine) - 1) + vb ** 2 / (len(theirs) - 1))
            half = _t(df) * se
        else:
            half = 0.0
        out.update(lo=diff - half, hi=diff + half, pairing='Welch')
    return out
