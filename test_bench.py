"""bench.py runs on the CPU and prints one JSON object per method with the documented fields."""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_json_on_cpu(image_folder):
    result = subprocess.run(
        [sys.executable, 'bench.py', '--device', 'cpu', '--json', '--methods', 'mae,mrmae,dbot', '--batch_size', '2',
         '--steps', '1', '--warmup_steps', '0', '--clip_model', 'ViT-S-16', '--dino_model',
         'vit_small_patch16_224.dino', '--data', str(image_folder), '--num_workers', '0', '--precision', 'bf16',
         '--profile', '2'],
        cwd=Path(__file__).parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    assert [row['method'] for row in rows] == ['mae', 'mrmae', 'dbot', 'loader:workers']
    for row in rows[:3]:
        assert {'method', 'model', 'device', 'batch_size', 'img_per_s', 'peak_mem_mb', 'mfu'} <= set(row)
        assert row['img_per_s'] > 0 and row['mfu'] is None and row['peak_mem_mb'] is None  # CPU
        assert row['precision'] == 'bf16'  # the GPU's autocast path, here on the CPU
    assert rows[1]['gflops_per_img'] > rows[2]['gflops_per_img'] > rows[0]['gflops_per_img']  # teachers cost FLOPs
    assert rows[1]['teacher_ms'] > 0 and rows[0]['teacher_ms'] == 0
    assert rows[3]['img_per_s'] > 0 and rows[3]['worker_ms_per_image'] > 0
    for row in rows[:3]:  # --profile 2: one more step's operators, the two slowest first (no kernels on a CPU)
        top = row['profile']['top']
        assert len(top) == 2 and top[0]['ms'] >= top[1]['ms'] > 0
        assert row['profile']['kernels'] is None and row['profile']['launches'] is None
    operators = [row['profile']['operators'] for row in rows[:3]]
    assert operators[1] > operators[2] > operators[0]  # two teachers, then one, then none
    assert 'profile' not in rows[3]


def test_bench_data_only_per_pipeline(image_folder):
    """--data_only measures each input pipeline alone, with what a worker spends per image (a figure, not compared
    here: timings belong to benchmarks, and on 40 px images reading a header costs about what decoding does)."""
    rows = {}
    for pipeline in ([], ['--decode_on_device'], ['--gpu_data']):
        result = subprocess.run(
            [sys.executable, 'bench.py', '--device', 'cpu', '--json', '--data', str(image_folder), '--data_only',
             '--batch_size', '4', '--steps', '2', '--num_workers', '0', *pipeline],
            cwd=Path(__file__).parent, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        row = json.loads(result.stdout.splitlines()[-1])
        rows[row['method']] = row
    assert set(rows) == {'loader:workers', 'loader:decode_on_device', 'loader:gpu_data'}
    assert all(row['img_per_s'] > 0 for row in rows.values())
    assert all(rows[f'loader:{name}']['worker_ms_per_image'] > 0 for name in ('workers', 'decode_on_device'))
    assert rows['loader:gpu_data']['worker_ms_per_image'] is None  # decoded once, before the clock
    costs = rows['loader:decode_on_device']['main_process_per_batch']
    assert costs['images'] == 4 and all(costs[name]['host_ms'] > 0 and costs[name]['kernels'] is None  # CPU
                                        for name in ('one_by_one', 'batched'))


def test_the_batched_device_side_calls_a_fixed_number_of_operators_per_batch(image_folder):
    """Per batch, --decode_on_device's main process calls as many operators for 8 images as for 4, but for the
    decoder's (on the CPU torchvision decodes a list in a loop; on a GPU in one call); image by image, about ten more
    per image, and a hundred Python calls more. Counted by torch's profiler, as bench.py reports them."""
    import bench
    import data
    import torch
    costs = {}
    for batch_size in (4, 8):
        args = bench.get_args_parser().parse_args(['--device', 'cpu', '--data', str(image_folder), '--data_only',
                                                   '--decode_on_device', '--img_size', '32', '--num_workers', '0',
                                                   '--batch_size', str(batch_size)])
        images = data.build_training_images(args, rank=0, world_size=1, device=torch.device('cpu'))
        costs[batch_size] = bench.main_process_per_batch(images, torch.device('cpu'))
    assert costs[8]['batched']['ops'] - costs[4]['batched']['ops'] == 4  # the CPU decoder's one call per image
    assert costs[8]['one_by_one']['ops'] - costs[4]['one_by_one']['ops'] >= 4 * 8
    assert costs[8]['one_by_one']['python_calls'] - costs[4]['one_by_one']['python_calls'] > 4 * 80
    assert costs[8]['batched']['python_calls'] - costs[4]['batched']['python_calls'] < 4 * 30


def test_bench_leaves_tmp_as_it_found_it_and_skips_a_peer_whose_package_is_missing(tmp_path):
    """MR-MAE's stand-in teachers (hundreds of MB at ViT-B) live in a temporary folder that is removed; hf_vitmae
    without transformers is one line, not a traceback."""
    (tmp_path / 'tmp').mkdir()
    env = dict(os.environ, TMPDIR=str(tmp_path / 'tmp'))
    # importing torchvision makes torch's (empty) compile-cache folder there: that much any torch program leaves
    subprocess.run([sys.executable, '-c', 'import bench'], cwd=Path(__file__).parent, env=env, check=True)
    imports_leave = sorted((tmp_path / 'tmp').rglob('*'))
    result = subprocess.run(
        [sys.executable, 'bench.py', '--device', 'cpu', '--json', '--methods', 'mrmae,hf_vitmae', '--batch_size', '2',
         '--steps', '1', '--warmup_steps', '0', '--clip_model', 'ViT-S-16', '--dino_model',
         'vit_small_patch16_224.dino'], cwd=Path(__file__).parent, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted((tmp_path / 'tmp').rglob('*')) == imports_leave
    methods = [json.loads(line)['method'] for line in result.stdout.splitlines() if line.startswith('{')]
    if importlib.util.find_spec('transformers') is None:
        assert methods == ['mrmae'] and 'skipping hf_vitmae: transformers is not installed' in result.stderr
    else:
        assert methods == ['mrmae', 'hf_vitmae']


@pytest.mark.parametrize('argv', [['--methods', 'foo'], ['--methods', 'mae,,dbot'], ['--steps', '0'],
                                  ['--warmup_steps', '-1'], ['--data_only'], ['--epochs', '5'], ['--resume', 'x.pth'],
                                  ['--suite', 'gpu'], ['--suite', 'gpu', '--model', 'vit_small'],
                                  ['--suite', 'gpu', '--methods', 'mae'], ['--profile', '-1'],
                                  ['--data', '.', '--data_only', '--profile', '3']])
def test_bench_refuses_flags_it_cannot_honour_in_one_line(argv, monkeypatch):
    import bench
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--device', 'cpu', *argv])
    with pytest.raises(SystemExit) as refusal:  # in this process: the refusals come before any measurement
        bench.main()
    message = str(refusal.value.code)
    assert message.startswith('error: ') and '\n' not in message, message


def test_a_suite_runs_its_rows_with_their_flags_and_names_each_result(image_folder, monkeypatch, capsys):
    """--suite gpu needs a GPU (refused above on the CPU); its machinery, on the CPU with rows of tiny size: each row's
    flags reach the measurement, and each result names its row."""
    import bench
    tiny = dict(model='vit_tiny', img_size=32, patch_size=8, decoder_dim=32, decoder_depth=1, decoder_heads=4,
                batch_size=2)
    monkeypatch.setitem(bench.SUITES, 'gpu', [('tiny, eager', 'mae,dbot', tiny),
                                              ('tiny, patch 16', 'mae', dict(tiny, patch_size=16)),
                                              ('loader', 'loader', dict(img_size=32, batch_size=4, num_workers=0))])
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--suite', 'gpu', '--device', 'cuda', '--data', str(image_folder),
                                      '--json', '--steps', '1', '--warmup_steps', '0'])
    monkeypatch.setattr(bench.train, 'validate_args', lambda args: setattr(args, 'device', 'cpu'))  # no GPU here
    monkeypatch.setattr(bench.runtime, 'stop_on_signals', contextlib.nullcontext)
    bench.main()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    assert [(row['suite_row'], row['method']) for row in rows] == [
        ('tiny, eager', 'mae'), ('tiny, eager', 'dbot'), ('tiny, patch 16', 'mae'), ('loader', 'loader:workers')]
    assert [row['patch_size'] for row in rows[:3]] == [8, 8, 16] and rows[3]['batch_size'] == 4


def test_checkpoint_stall_measures_both_saves_and_dbots_checkpoint_loses_its_teacher():
    result = subprocess.run(
        [sys.executable, 'bench.py', '--device', 'cpu', '--model', 'vit_tiny', '--img_size', '32', '--patch_size', '8',
         '--decoder_dim', '32', '--decoder_depth', '1', '--checkpoint_stall', '--methods', 'mae,dbot'],
        cwd=Path(__file__).parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    mae, dbot = [json.loads(line) for line in result.stdout.splitlines()]
    assert (mae['method'], dbot['method']) == ('mae', 'dbot')
    assert all(row['synchronous_s'] > 0 and row['background_s'] > 0 for row in (mae, dbot))
    assert mae['checkpoint_mb_now'] == mae['checkpoint_mb_before'] > 0  # no teacher to leave out
    assert dbot['checkpoint_mb_now'] < dbot['checkpoint_mb_before']  # its teacher's weights are a file of their own
