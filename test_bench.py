"""bench.py runs on the CPU and prints one JSON object per method with the documented fields."""

import json
import subprocess
import sys
from pathlib import Path


def test_bench_json_on_cpu(image_folder):
    result = subprocess.run(
        [sys.executable, 'bench.py', '--device', 'cpu', '--json', '--methods', 'mae,mrmae,dbot', '--batch_size', '2',
         '--steps', '1', '--warmup_steps', '0', '--clip_model', 'ViT-S-16', '--dino_model',
         'vit_small_patch16_224.dino', '--data', str(image_folder), '--num_workers', '0', '--precision', 'bf16'],
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


def test_bench_data_only_per_pipeline(image_folder):
    """--data_only measures each input pipeline alone; reading bytes costs a worker less than decoding and
    augmenting."""
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
    assert rows['loader:decode_on_device']['worker_ms_per_image'] < rows['loader:workers']['worker_ms_per_image']
