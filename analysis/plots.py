"""The report's PNG figures (matplotlib, Agg backend): each function writes one file and returns its path."""
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KIND_COLOURS = {'GKA': 'tab:red', 'compact': 'tab:purple', 'VLT': 'tab:orange', 'baseline': 'tab:blue',
                'other': 'tab:green'}


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def top1_vs_gflops(rows: List[Dict], path: str, groups: Optional[List[Dict]] = None) -> str:
    """A point per run (x: GFLOPs = 2 x MACs, y: top-1), each model joined to its same-shape baseline; for a
    configuration of several seeds (``groups``: analysis.seeds.groups) its mean with an error bar of +- one
    standard deviation."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    by_run = {r['run']: r for r in rows}
    for r in rows:
        base = by_run.get(r.get('baseline_run'))
        if base is not None:
            ax.plot([base['gflops'], r['gflops']], [base['top1'], r['top1']], color='0.6', lw=1, zorder=1)
    for kind, colour in KIND_COLOURS.items():
        pts = [r for r in rows if r['kind'] == kind]
        if pts:
            ax.scatter([r['gflops'] for r in pts], [r['top1'] for r in pts], color=colour, label=kind, zorder=2, s=36)
    for g in groups or []:
        if g['n'] > 1:
            first = g['runs'][0]
            ax.errorbar([first['gflops']], [g['mean']], yerr=[g['std']], fmt='D', mfc='none', capsize=4, zorder=3,
                        color=KIND_COLOURS.get(first['kind'], 'k'))
            ax.annotate(f"{g['name']} (n={g['n']})", (first['gflops'], g['mean']), textcoords='offset points',
                        xytext=(-5, -12), fontsize=8, ha='right')
    for r in rows:
        if not any(g['n'] > 1 and r in g['runs'] for g in groups or []):
            ax.annotate(r['label'], (r['gflops'], r['top1']), textcoords='offset points', xytext=(5, 4), fontsize=8)
    ax.set_xlabel('GFLOPs per image (2 x multiply-accumulates)')
    ax.set_ylabel('top-1 accuracy (%)')
    ax.set_title('Accuracy against compute (lines join same-shape pairs)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(x=0.25, y=0.2)
    return _save(fig, path)


def params_by_part(rows: List[Dict], path: str) -> str:
    """Stacked bars of parameters (millions): attention, MLP, other (embeddings, norms, head)."""
    labels = [r['label'] for r in rows]
    parts = [('params_attn', 'attention', 'tab:red'), ('params_mlp', 'MLP', 'tab:blue'),
             ('params_other', 'other (embeddings, norms, head)', 'tab:gray')]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.4))
    bottom = np.zeros(len(rows))
    for key, name, colour in parts:
        values = np.array([(r.get(key) or 0) / 1e6 for r in rows])
        ax.bar(labels, values, bottom=bottom, label=name, color=colour)
        bottom += values
    for i, total in enumerate(bottom):
        ax.text(i, total, f'{total:.2f} M', ha='center', va='bottom', fontsize=8)
    ax.set_ylabel('parameters (millions)')
    ax.set_title('Parameters by part')
    ax.set_ylim(0, bottom.max() * 1.15 if len(bottom) else 1)
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=20, ha='right', fontsize=8)
    return _save(fig, path)


def sigma_heatmap(sigma: np.ndarray, title: str, path: str, sigma_init: Optional[float] = None,
                  name: str = 'sigma') -> str:
    """Heatmap of the learned bandwidth (GKA's sigma; ``name='h'`` for a compact kernel's), layers (rows) x
    heads (columns), values written in."""
    layers, heads = sigma.shape
    digits = 2 if np.ptp(sigma) >= 0.05 else 3 if np.ptp(sigma) >= 0.005 else 4
    fig, ax = plt.subplots(figsize=(1.2 + 0.75 * heads, 1.2 + 0.42 * layers))
    im = ax.imshow(sigma, cmap='viridis', aspect='auto')
    for i in range(layers):
        for j in range(heads):
            colour = 'white' if sigma[i, j] < sigma.min() + 0.6 * np.ptp(sigma) else 'black'
            ax.text(j, i, f'{sigma[i, j]:.{digits}f}', ha='center', va='center', fontsize=7, color=colour)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel('head')
    ax.set_ylabel('layer')
    init = f' (init {sigma_init:.2f})' if sigma_init is not None else ''
    ax.set_title(f'{title}: learned {name}{init}', fontsize=9)
    fig.colorbar(im, ax=ax, label=name)
    return _save(fig, path)


def token_sigma_maps(images: np.ndarray, sigma: np.ndarray, grid: Sequence[int], prefix: int, title: str,
                     path: str, bandwidth: str = 'query') -> str:
    """Data-dependent bandwidths over the patch grid: a row per image (``images`` (B, C, H, W), normalised), its
    picture first, then per layer the heads' mean sigma_i of every patch token (``sigma`` (layers, B, heads, tokens);
    the ``prefix`` tokens, e.g. the class token, left out), one colour scale per layer."""
    layers, count = sigma.shape[0], min(4, images.shape[0])
    maps = sigma[:, :count, :, prefix:].mean(2).reshape(layers, count, *grid)
    fig, axes = plt.subplots(count, layers + 1, figsize=(1.6 * (layers + 1), 1.7 * count), squeeze=False)
    for b in range(count):
        picture = images[b].transpose(1, 2, 0)
        axes[b][0].imshow(picture[..., 0] if picture.shape[-1] == 1 else
                          (picture - picture.min()) / max(np.ptp(picture), 1e-12), cmap='gray')
        for layer in range(layers):
            ax = axes[b][layer + 1]
            im = ax.imshow(maps[layer, b], cmap='magma', vmin=maps[layer].min(), vmax=maps[layer].max())
            if b == 0:
                ax.set_title(f'layer {layer}', fontsize=8)
            if b == count - 1:
                fig.colorbar(im, ax=ax, orientation='horizontal', fraction=0.08, pad=0.08)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f'{title}: sigma per {bandwidth} token (mean over heads)', fontsize=9)
    return _save(fig, path)


def attention_distance(results: Sequence[Dict], path: str, num_images: int) -> str:
    """Mean attention distance (patches) per head against layer, one panel per model, shared y axis."""
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.8), sharey=True, squeeze=False)
    for ax, res in zip(axes[0], results):
        dist = np.asarray(res['distance'])
        layers, heads = dist.shape
        for h in range(heads):
            ax.scatter(np.arange(layers), dist[:, h], s=18, label=f'head {h}')
        ax.plot(np.arange(layers), dist.mean(1), color='black', lw=1, label='mean')
        ax.set_title(res['label'], fontsize=9)
        ax.set_xlabel('layer')
        ax.set_xticks(range(layers))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel('mean attention distance (patches)')
    axes[0][-1].legend(fontsize=7, loc='best')
    fig.suptitle(f'Mean attention distance per head ({num_images} test images)', fontsize=10)
    return _save(fig, path)


def sparsity(rows: Sequence[Dict], path: str) -> str:
    """Attention sparsity (fraction of exact zeros of the weights) against layer, one line per run with
    ``sparsity_layers``; compact kernels solid, GKA dashed (its zeros are float32 underflow)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = 'osD^v<>ph*'
    for i, r in enumerate(rows):
        values = np.asarray(r['sparsity_layers'], dtype=float)
        compact = r.get('kind') == 'compact'
        ax.plot(np.arange(len(values)), values, marker=markers[i % len(markers)], ms=5,
                ls='-' if compact else '--', lw=1.5 if compact else 1.0,
                label=f"{r['label']} (mean {np.mean(values):.2f})")
    layers = max(len(r['sparsity_layers']) for r in rows)
    ax.set_xticks(range(layers))
    ax.set_xlabel('layer')
    ax.set_ylabel('fraction of exact zeros')
    ax.set_ylim(-0.03, 1.03)
    ax.set_title('Attention sparsity per layer', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='best')
    return _save(fig, path)


def learning_curves(groups: Sequence[Dict], path: str) -> str:
    """Training loss and test top-1 per epoch (two panels): a line per configuration, its seeds' mean with a band
    from their lowest to their highest value. ``groups``: analysis.seeds.groups of the report's rows, each run with
    ``curve`` = {'epoch': [...], 'train_loss': [...], 'eval_top1': [...]} (None where an epoch was not evaluated)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for i, g in enumerate(groups):
        colour = colours[i % len(colours)]
        for ax, key in zip(axes, ('train_loss', 'eval_top1')):
            per_epoch: Dict[int, List[float]] = {}
            for r in g['runs']:
                for epoch, value in zip(r['curve']['epoch'], r['curve'][key]):
                    if value is not None:
                        per_epoch.setdefault(epoch, []).append(value)
            if not per_epoch:
                continue
            epochs = sorted(per_epoch)
            values = [per_epoch[e] for e in epochs]
            label = f"{g['name']} (n={g['n']})" if g['n'] > 1 else g['name']
            ax.plot(epochs, [np.mean(v) for v in values], marker='o', ms=3, color=colour, label=label)
            if g['n'] > 1:
                ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.2)
    for ax, ylabel in zip(axes, ('training loss', 'test top-1 (%)')):
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle('Learning curves (bands: lowest to highest over seeds)')
    return _save(fig, path)
