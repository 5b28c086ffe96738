"""What README and docs/ tell a reader, checked: every name the reading guide cites exists where it says, every
docs page is linked, and the shell commands for Tiny-ImageNet work on a miniature of the official archive's layout
(sorting the official val/ into class folders, and taking the 50-class subset the results use)."""

import ast
import re
import subprocess
from pathlib import Path

import data
import train

HERE = Path(__file__).parent
README = (HERE / 'README.md').read_text()
DOCS = README + ''.join(path.read_text() for path in sorted((HERE / 'docs').glob('*.md')))


def readme_line(containing):
    lines = [line.strip() for line in DOCS.splitlines() if containing in line]
    assert len(lines) == 1, f'README and docs/ should hold one command with {containing!r}'
    return lines[0]


def defined_names(path):
    """Top-level functions, classes and constants, and Class.method."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f'{node.name}.{item.name}' for item in node.body if isinstance(item, ast.FunctionDef))
        if isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def test_every_name_in_the_reading_guide_exists_in_the_file_it_names():
    guide = README.split('## Reading guide')[1].split('\n## ')[0]
    cited = 0
    for row in guide.splitlines():
        cells = [cell.strip() for cell in row.strip('|').split('|')]
        if len(cells) != 3 or not re.fullmatch(r'`\w+\.py`', cells[1]):
            continue
        path = HERE / cells[1].strip('`')
        names = defined_names(path)
        for name in re.findall(r'`([A-Za-z_][\w.]*)`', re.sub(r'\([^)]*\)', '', cells[2])):  # not the asides
            assert name in names, f'the reading guide cites {cells[1]}: {name}, which {path.name} does not define'
            cited += 1
    assert cited > 50


def test_readme_links_every_docs_page_and_every_link_resolves():
    for path in sorted((HERE / 'docs').glob('*.md')):
        assert f'](docs/{path.name})' in README, f'README does not link {path}'
    for page in [HERE / 'README.md', *sorted((HERE / 'docs').glob('*.md'))]:
        for target in re.findall(r'\]\(([^)#:]+\.md)\)', page.read_text()):
            assert (page.parent / target).exists(), f'{page.name} links {target}, which does not exist'


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
    val = data.build_dataset(args, 'val', None)
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
