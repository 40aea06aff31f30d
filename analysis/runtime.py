"""The report's runtime table (Table 4): from ``eval.py bench=true`` (bench.json) where the sweep has it, else
measured by the report, but only on the machine where the jobs ran.

A Slurm sweep's end-of-sweep report runs on the submitting host, usually a login node without the jobs' GPUs:
timing the models there would describe that host, not the runs. Each job records its host in results.json; the
report measures (each pair interleaved in one process) only when every run of a pair ran on this host, and
otherwise leaves the pair out with one line saying how to measure it where the jobs ran.
"""
import json
import socket
from typing import Dict, List, Sequence, Tuple

from vit_gka.analysis import seeds
from vit_gka.analysis.tables import load_bench

__all__ = ['runtime_rows', 'measure_runtime', 'model_args_of']


def model_args_of(row: Dict) -> Dict:
    """The run's create_model arguments without the regularisers that a throughput measurement leaves out."""
    return {k: v for k, v in (row.get('model_args') or {}).items() if not k.endswith(('drop_rate', 'drop_path_rate'))}


def _pairs(rows: List[Dict]) -> List[Tuple[Dict, Dict]]:
    """(run, its baseline run), once per distinct pair of architectures (seeds share one)."""
    by_run = {r['run']: r for r in rows}
    out, seen = [], set()
    for r in rows:
        base = by_run.get(r.get('baseline_run'))
        if base is None:
            continue
        key = json.dumps([(x['model'], model_args_of(x)) for x in (r, base)], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((r, base))
    return out


def measure_runtime(pairs: Sequence[Tuple[Dict, Dict]], batch_size: int = 64, steps: int = 3,
                    rounds: int = 3) -> List[Dict]:
    """Table 4's rows of ``pairs``: each run's architecture against its baseline's, interleaved in this process
    (``benchmark_models``: the two take turns, medians; bf16 on CUDA). Runs that ran one after the other cannot be
    compared by their own throughput: another job on the machine during one of them moves the ratio (their own
    numbers stay in results.json)."""
    import torch

    from vit_gka.measure.benchmark import benchmark_models, device_name
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    out = []
    for r, base in pairs:
        models = [{'label': seeds.config_name(x), 'name': x['model'], 'args': model_args_of(x)} for x in (r, base)]
        source = f"interleaved here, {device_name(device)}: {models[0]['label']} / {models[1]['label']}"
        measured = benchmark_models(models, device, batch_size=batch_size, warmup=1, steps=steps, rounds=rounds,
                                    amp=device.type == 'cuda', train=True)
        out += [dict(row, source=source) for row in measured]
    return out


def runtime_rows(rows: List[Dict], paths: Sequence[str]) -> Tuple[List[Dict], List[str]]:
    """(Table 4's measured rows, notes for the report): bench.json under ``paths`` if any, else the pairs whose
    runs all ran on this host, measured here; a note for the pairs that ran elsewhere (or on an unrecorded host)."""
    bench = load_bench(paths)
    if bench:
        return bench, []
    here = socket.gethostname()
    local, elsewhere = [], []
    for r, base in _pairs(rows):
        (local if r.get('host') == here and base.get('host') == here else elsewhere).append((r, base))
    notes = []
    if elsewhere:
        hosts = sorted({str(x.get('host') or 'an unrecorded host') for pair in elsewhere for x in pair})
        notes.append(f"Not measured for {', '.join(seeds.config_name(r) for r, _ in elsewhere)}: the jobs ran on "
                     f"{', '.join(hosts)}, this report on {here}, whose speed says nothing about theirs. Measure on "
                     f"the jobs' machine with `python eval.py run=<run folder> bench=true` (bench.json), then "
                     f"rebuild the report with `vit-gka-report <sweep folder>`.")
    return (measure_runtime(local) if local else []), notes
