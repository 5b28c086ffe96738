"""A method file copied into someone else's project: README's "Copy a method" blocks, each run in an empty folder
holding only the files its first line names, in a fresh interpreter where this repository's other files (and
open_clip, which no block needs) cannot be imported."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
SECTION = (HERE / 'README.md').read_text().split('## Copy a method')[1].split('\n## ')[0]
BLOCKS = re.findall(r'```python\n(.*?)```', SECTION, flags=re.S)
# Everything of this repository that is not a method file: a copied method must never reach for it.
MACHINERY = ['runtime', 'checkpoints', 'flags', 'data', 'train', 'finetune', 'frozen', 'flops', 'device_augment',
             'bench', 'reproduce', 'open_clip']
BLOCK = "import sys\nfor name in {names}:\n    sys.modules[name] = None  # import raises ImportError\n{code}"


def files_of(block):
    return block.splitlines()[0].removeprefix('# files:').split()


def test_readme_holds_a_block_for_every_copy_set_the_issue_names():
    assert [files_of(block) for block in BLOCKS] == [
        ['mae.py'], ['mae.py', 'dbot.py'], ['mae.py', 'mcmae.py'], ['mae.py', 'mcmae.py', 'teachers.py', 'mrmae.py']]


@pytest.mark.parametrize('block', BLOCKS, ids=[' '.join(files_of(block)) for block in BLOCKS])
def test_a_copied_method_trains_in_an_empty_folder(block, tmp_path):
    for name in files_of(block):
        shutil.copy(HERE / name, tmp_path / name)
    script = tmp_path / 'loop.py'
    script.write_text(BLOCK.format(names=MACHINERY, code=block) + "print('trained')\n")
    done = subprocess.run([sys.executable, '-E', '-s', script.name], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # -E -s: neither PYTHONPATH nor the user's site reaches this repository
    assert done.returncode == 0 and done.stdout.strip().endswith('trained'), done.stderr[-2000:]


def test_a_method_file_imports_nothing_of_the_repository_beyond_its_method():
    allowed = {'mae.py': set(), 'dbot.py': {'mae'}, 'mcmae.py': {'mae'}, 'mrmae.py': {'mae', 'mcmae', 'teachers'},
               'teachers.py': {'mae', 'mcmae'}}
    ours = {path.stem for path in HERE.glob('*.py')}
    for name, may in allowed.items():
        top_level = re.findall(r'^(?:from|import) (\w+)', (HERE / name).read_text(), flags=re.M)
        assert set(top_level) & ours <= may, name
