"""reproduce.py runs the whole protocol end to end at a minuscule scale and writes the table and both figures."""

import json

import reproduce


def test_smoke_protocol_writes_table_figures_and_commands(image_folder, tmp_path):
    reproduce.main(reproduce.get_args_parser().parse_args(
        ['--data', str(image_folder), '--output_dir', str(tmp_path), '--smoke', '--img_size', '32']))
    table = (tmp_path / 'results.md').read_text().splitlines()[2:]
    assert [row.split(' | ')[0].strip('| ') for row in table] == reproduce.PRETRAIN + ['scratch']
    rows = {row.split(' | ')[0].strip('| '): row.split(' | ') for row in table}
    assert float(rows['mrmae'][3]) >= float(rows['mae'][3])  # MR-MAE's compute includes its teachers' pre-training
    assert rows['scratch'][5:] == ['-', '- |']  # no frozen-feature evaluation of a random encoder
    commands = (tmp_path / 'commands.txt').read_text().splitlines()
    assert len(commands) == 5 + 5 * 3 + 1 and commands[0].startswith('python train.py')
    assert any('--teacher' in c and 'mae/checkpoint-last.pth+' in c for c in commands if '--method mrmae' in c)
    assert (tmp_path / 'finetune_top1.png').stat().st_size > 0 and (tmp_path / 'pretrain_loss.png').stat().st_size > 0
    # a second sitting finds every run finished: the wall-clock of each stays the first sitting's
    first = {name: json.loads((tmp_path / name / 'wall_clock.json').read_text())['seconds'] for name in reproduce.PRETRAIN}
    assert all(seconds > 0 for seconds in first.values())
    reproduce.main(reproduce.get_args_parser().parse_args(
        ['--data', str(image_folder), '--output_dir', str(tmp_path), '--smoke', '--img_size', '32']))
    assert first == {name: json.loads((tmp_path / name / 'wall_clock.json').read_text())['seconds']
                     for name in reproduce.PRETRAIN}
