"""Nothing hangs: a failure in a run with loader workers (which ignore the stop signals while the run goes on)
still exits, and a FIFO among the images is skipped and counted instead of blocking the reader. A file name that
is not UTF-8 is logged escaped, not as a logging error."""
import json
import os

from PIL import Image

from helpers import check, needs_data, run

HANG = 120  # seconds: far more than these runs take; a hang fails the test instead of blocking the suite


@needs_data
def test_a_failure_with_loader_workers_exits(tmp_path):
    proc = run(['epochs=1', 'train_subset=64', 'data.eval_subset=32', 'batch_size=32', 'workers=1',
                'progress=false', 'model.args.depth=1', f'hydra.run.dir={tmp_path}/run'], cwd=tmp_path, timeout=HANG,
               env={'VIT_GKA_TEST_RAISE': '2'})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert 'RuntimeError: VIT_GKA_TEST_RAISE: a failure injected at update 2' in proc.stderr


def test_fifo_and_non_utf8_names_are_skipped_and_logged(tmp_path):
    root = tmp_path / 'data'
    for split in ('train', 'val'):
        for c in ('c0', 'c1'):
            os.makedirs(root / split / c)
            for i in range(4):
                Image.new('L', (28, 28), color=30 * i + (100 if c == 'c1' else 0)).save(root / split / c / f'{i}.png')
    os.mkfifo(root / 'train' / 'c0' / 'x.png')
    folder = os.fsencode(str(root / 'train' / 'c1'))
    with open(os.path.join(folder, b'bad\xff.png'), 'wb') as f:  # not UTF-8, and not an image
        f.write(b'not a png')
    Image.new('L', (28, 28)).save(os.path.join(folder, b'good\xfe.png').decode('utf-8', 'surrogateescape'))
    run_dir = tmp_path / 'run'
    proc = check(run(['data=folder', f'data.root={root}', 'data.in_chans=1', 'model.args.depth=1', 'epochs=1',
                      'batch_size=4', 'workers=1', 'progress=false', f'hydra.run.dir={run_dir}'], cwd=tmp_path,
                     timeout=HANG))
    log = proc.stdout + proc.stderr
    assert 'Logging error' not in log and 'Traceback' not in log
    assert 'x.png (not a regular file)' in log and 'bad\\xff.png' in log
    with open(run_dir / 'results.json') as f:
        assert json.load(f)['unreadable_images'] == 2
