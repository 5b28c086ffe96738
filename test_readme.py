"""README's shell commands for Tiny-ImageNet, run on a miniature of the official archive's layout: sorting the
official val/ into class folders, and taking the 50-class subset the results use."""

import subprocess
from pathlib import Path

import train

README = (Path(__file__).parent / 'README.md').read_text()


def readme_line(containing):
    lines = [line.strip() for line in README.splitlines() if containing in line]
    assert len(lines) == 1, f'README should hold one command with {containing!r}'
    return lines[0]


def official_archive(root, wnids):
    """tiny-imagenet-200 as cs231n distributes it: train/WNID/images/*.JPEG, val/images/*.JPEG + val_annotations.txt."""
    from PIL import Image
    base = root / 'tiny-imagenet-200'
    (base / 'val' / 'images').mkdir(parents=True)
    annotations = []
    for k, wnid in enumerate(wnids):
        (base / 'train' / wnid / 'images').mkdir(parents=True)
        for i in range(2):
            Image.new('RGB', (64, 64), (k * 40, i * 90, 0)).save(base / 'train' / wnid / 'images' / f'{wnid}_{i}.JPEG')
        Image.new('RGB', (64, 64), (k * 40, 0, 0)).save(base / 'val' / 'images' / f'val_{k}.JPEG')
        annotations.append(f'val_{k}.JPEG\t{wnid}\t0\t0\t63\t63')
    (base / 'val' / 'val_annotations.txt').write_text('\n'.join(annotations) + '\n')
    (base / 'wnids.txt').write_text('\n'.join(wnids) + '\n')
    return base


def test_readme_val_sorting_makes_the_official_val_readable(tmp_path):
    base = official_archive(tmp_path, ['n01443537', 'n01629819', 'n01641577'])
    subprocess.run(['bash', '-c', readme_line('< val_annotations.txt')], cwd=tmp_path, check=True)
    args = train.get_args_parser().parse_args(['--data', str(base)])
    val = train.build_dataset(args, 'val', None)
    assert val.classes == ['n01443537', 'n01629819', 'n01641577'] and len(val) == 3
    assert [label for _, label in val.samples] == [0, 1, 2]  # each image under its own class


def test_readme_subset_takes_the_first_lines_of_wnids(tmp_path):
    wnids = [f'n{k:08d}' for k in range(52, 0, -1)]  # 52 classes, the file's order not the sorted one
    base = official_archive(tmp_path, wnids)
    subprocess.run(['bash', '-c', readme_line('< val_annotations.txt')], cwd=tmp_path, check=True)
    command = readme_line('head -50 tiny-imagenet-200/wnids.txt').replace('/tmp/data', str(tmp_path / 'out'))
    subprocess.run(['bash', '-c', command], cwd=tmp_path, check=True)
    subset = tmp_path / 'out' / 'tiny-imagenet-200'
    assert sorted(p.name for p in (subset / 'train').iterdir()) == sorted(wnids[:50])
    assert sorted(p.name for p in (subset / 'val').iterdir()) == sorted(wnids[:50])
    assert base.exists()  # the full set is copied from, not moved
