"""Seeds: mean +- std per configuration and the change against the baseline with a 95% interval, paired by seed
where both sides ran the same seeds (vit_gka/analysis/seeds.py), in the report's Seeds table and the sweep table.
Checked against scipy's own tests of the same numbers."""
import pytest
from scipy import stats

from vit_gka.analysis import report, seeds, summary


def runs(config, kind, top1s, seed0=0, shape='fmnist'):
    return [{'model_config': config, 'model': config, 'kind': kind, 'shape': shape, 'data': 'fashion_mnist',
             'epochs': 1, 'seed': seed0 + i, 'top1': v, 'run': f'{config}_{seed0 + i}', 'label': f'{config} s{i}'}
            for i, v in enumerate(top1s)]


GKA, DEIT = [85.1, 85.9, 84.8], [86.0, 86.6, 86.1]


def test_paired_interval_is_scipys_paired_t():
    c = seeds.compare(runs('gka', 'GKA', GKA), runs('deit', 'baseline', DEIT))
    expect = stats.ttest_rel(GKA, DEIT).confidence_interval(0.95)
    assert c['pairing'] == 'paired' and c['diff'] == pytest.approx(sum(GKA) / 3 - sum(DEIT) / 3)
    assert (c['lo'], c['hi']) == pytest.approx((expect.low, expect.high))


def test_unpaired_seeds_take_welchs_interval_and_one_seed_none():
    c = seeds.compare(runs('gka', 'GKA', GKA), runs('deit', 'baseline', DEIT, seed0=10))
    expect = stats.ttest_ind(GKA, DEIT, equal_var=False).confidence_interval(0.95)
    assert c['pairing'] == 'Welch' and (c['lo'], c['hi']) == pytest.approx((expect.low, expect.high))
    single = seeds.compare(runs('gka', 'GKA', GKA[:1]), runs('deit', 'baseline', DEIT[:1]))
    assert single['pairing'] == 'single' and single['lo'] is None and single['diff'] == pytest.approx(-0.9)


def test_report_seed_table_and_sweep_lines():
    rows = runs('gka_fmnist', 'GKA', GKA) + runs('deit_fmnist', 'baseline', DEIT)
    table = {r['label']: r for r in report.seed_table(rows)}
    gka = table['gka_fmnist']
    assert gka['n'] == 3 and gka['seeds'] == '0,1,2' and gka['baseline'] == 'deit_fmnist' and gka['pairing'] == 'paired'
    assert gka['top1_mean'] == pytest.approx(sum(GKA) / 3) and gka['top1_std'] == pytest.approx(stats.tstd(GKA))
    assert gka['ci_lo'] < gka['d_top1'] < gka['ci_hi'] and table['deit_fmnist']['baseline'] is None
    assert report.seed_table(runs('gka_fmnist', 'GKA', GKA[:1]) + runs('deit_fmnist', 'baseline', DEIT[:1])) == []
    lines = summary.seed_lines(rows)
    assert lines[0] == f'gka_fmnist: top-1 {sum(GKA) / 3:.2f} +- {stats.tstd(GKA):.2f} (n=3, seeds 0,1,2)'
    assert len(lines) == 2 and summary.seed_lines(rows[:1]) == []
