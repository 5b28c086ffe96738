"""reproduce.py runs the whole protocol end to end at a minuscule scale: the table, the records, the figures, the
commands; a second sitting skips finished runs and a stopped one continues where it stopped."""

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import reproduce
import runtime
import train


def protocol(data, tmp_path):
    return reproduce.get_args_parser().parse_args(
        ['--data', str(data), '--output_dir', str(tmp_path / 'results'), '--work_dir', str(tmp_path / 'work'),
         '--budget', 'smoke', '--img_size', '32'])


def test_smoke_protocol_writes_table_records_figures_and_commands(image_folder, tmp_path, monkeypatch):
    # A signal during dBOT's pre-training stops the sitting after dBOT has checkpointed: no record for it yet.
    real_main = train.main

    def main_signalled_in_dbot(args):
        if args.method == 'dbot' and not (tmp_path / 'work' / 'dbot' / 'checkpoint-last.pth').exists():
            runtime.request_stop()  # arrives before the first step's end: the run stops after it
        return real_main(args)

    monkeypatch.setattr(train, 'main', main_signalled_in_dbot)
    monkeypatch.setattr(runtime, 'stop_on_signals', contextlib.nullcontext)
    reproduce.main(protocol(image_folder, tmp_path))
    results = tmp_path / 'results'
    finished = {path.stem for path in (results / 'runs').glob('*.json')}
    assert finished == {'random-init-frozen', 'mae', 'mae-frozen'}
    runtime.stop_requested = False
    monkeypatch.setattr(train, 'main', real_main)
    reproduce.main(protocol(image_folder, tmp_path))

    table = (results / 'results.md').read_text().split('\n\n')[0].splitlines()[2:]
    rows = {line.split(' | ')[0].strip('| '): line.split(' | ') for line in table}
    assert list(rows) == list(reproduce.TARGETS)
    assert all('pending' not in line for line in table)
    assert 'Every run: ' in (results / 'results.md').read_text()  # the machine and OMP_NUM_THREADS, named
    assert float(rows['mrmae'][3]) >= float(rows['mae'][3])  # MR-MAE's compute includes its teachers' pre-training
    assert rows['dbot-stage1'][7:] == ['-', '- |'] and rows['mcmae'][7:] == ['-', '- |']  # not fine-tuned at this budget
    record = json.loads((results / 'runs' / 'mae-frozen.json').read_text())
    assert record['k'] == 16 and 0 <= record['linear_acc1'] <= 100 and record['command'].startswith('python finetune.py')
    assert {'seconds', 'omp_num_threads', 'machine'} <= set(record)
    dbot = json.loads((results / 'runs' / 'dbot.json').read_text())
    assert [json.loads(line)['stage'] for line in (results / 'logs' / 'dbot.jsonl').read_text().splitlines()] == [0, 1]
    assert dbot['seconds'] > 0 and dbot['epochs'] == 2
    commands = (results / 'commands.txt').read_text().splitlines()
    assert len(commands) == 1 + 2 * 5 + 1 + 2 + 3 and commands[1].startswith('python train.py')
    assert any('--teacher' in c and 'mae-encoder-fp16.pth+' in c for c in commands if '--method mrmae' in c)
    encoder = torch.load(results / 'encoders' / 'mae-encoder-fp16.pth')
    assert all(v.dtype == torch.float16 for v in encoder.values()) and 'decoder_embed.weight' not in encoder
    windows = [json.loads(line) for line in (results / 'logs' / 'steps' / 'dbot.jsonl').read_text().splitlines()]
    assert {window['stage'] for window in windows} == {0, 1}  # the loss between log points, kept for the chart
    for figure in ['top1.png', 'pretrain_loss.png', 'figures/mrmcmae-last-epoch.png']:
        assert (results / figure).stat().st_size > 0
    # a third sitting finds every run finished: nothing runs again
    before = {path.name: path.read_text() for path in (results / 'runs').glob('*.json')}
    monkeypatch.setattr(train, 'main', lambda args: (_ for _ in ()).throw(AssertionError('ran again')))
    reproduce.main(protocol(image_folder, tmp_path))
    assert before == {path.name: path.read_text() for path in (results / 'runs').glob('*.json')}


def test_learning_curve_keeps_checkpoints_along_one_schedule_and_evaluates_each(image_folder, tmp_path):
    args = reproduce.get_args_parser().parse_args(
        ['--data', str(image_folder), '--output_dir', str(tmp_path / 'results'), '--work_dir', str(tmp_path / 'work'),
         '--budget', 'smoke', '--img_size', '32', '--curve'])
    reproduce.main(args)
    curve = tmp_path / 'results' / 'curve'
    epochs, points = reproduce.BUDGETS['smoke']['curve']
    records = reproduce.read_records(curve / 'runs')
    # every row of the plan but the three-stage dBOT, which two epochs cannot hold
    rows = ('mae', 'dbot', 'dbot-mae-teacher', 'mrmae-mae-teacher', 'dbot-mae-teacher-2stages', 'mae-seed1')
    assert set(records) == {f'{r}-e{epochs}' for r in rows} | {f'{r}-e{epochs}-epoch{p}-frozen' for r in rows
                                                                 for p in points}
    for row in ('mae', 'dbot'):
        work = tmp_path / 'work' / 'curve' / f'{row}-e{epochs}'
        kept = {p: torch.load(work / f'checkpoint-epoch{p}.pth', weights_only=False) for p in points}
        assert [kept[p]['epoch'] for p in points] == list(points)  # each kept after its own epoch, not overwritten
        assert records[f'{row}-e{epochs}-epoch{points[0]}-frozen']['pretrain_epochs'] == points[0]
        assert f'checkpoint-epoch{points[0]}.pth' in records[f'{row}-e{epochs}-epoch{points[0]}-frozen']['command']
    assert not torch.equal(*(kept[p]['model']['cls_token'] for p in points))  # the encoder changed between points
    # the students learn from MAE's final encoder, kept in fp16 as the table's teachers are
    teacher = tmp_path / 'results' / 'encoders' / f'mae-e{epochs}-encoder-fp16.pth'
    mae_final = torch.load(tmp_path / 'work' / 'curve' / f'mae-e{epochs}' / 'checkpoint-last.pth', weights_only=False)
    assert torch.equal(torch.load(teacher)['cls_token'], mae_final['model']['cls_token'].half())
    for row, stages in (('dbot-mae-teacher', 1), ('dbot-mae-teacher-2stages', 2), ('mrmae-mae-teacher', 1)):
        assert f'--teacher {teacher}' in records[f'{row}-e{epochs}']['command']
        final = torch.load(tmp_path / 'work' / 'curve' / f'{row}-e{epochs}' / 'checkpoint-last.pth', weights_only=False)
        assert final['stage'] == stages - 1
    kept = torch.load(tmp_path / 'work' / 'curve' / f'dbot-mae-teacher-e{epochs}' / 'teacher-stage0.pth',
                      weights_only=False)  # the teacher dBOT's checkpoints name
    assert torch.equal(kept['model']['cls_token'], torch.load(teacher)['cls_token'].float())  # the file, unchanged
    assert reproduce.curve_rows(args, tmp_path, 8)[-1][3] == ['--stage_epochs', '3,3,2']  # the paper's 3 stages
    # the table and the chart: a line per row and the teacher's own top-1 as the reference line
    table = (curve / 'curve.md').read_text()
    assert table.count('| mae |') == len(points) and (curve / 'curve.png').stat().st_size > 0
    own = records[f'mae-e{epochs}-epoch{epochs}-frozen']
    assert f"| the students' teacher (MAE-{epochs}'s encoder) | {epochs} | {own['knn_acc1']:.1f} |" in table
    assert reproduce.curve_teacher(records, epochs) == own
    labels = {f'{r}-e{epochs}': label for r, _, _, _, label in reproduce.curve_rows(args, tmp_path, epochs)}
    assert len(reproduce.curve_points(records, labels)) == len(rows)
    assert 'random-init' not in table  # no band without the table's random-init records: none invented


def snapshot(folder):
    return {path: path.read_bytes() for path in sorted(folder.rglob('*')) if path.is_file()}


def test_another_data_set_never_touches_or_prints_the_committed_records(image_folder, tmp_path, monkeypatch):
    committed = Path(reproduce.__file__).parent / 'results'
    before = snapshot(committed)
    parse = reproduce.get_args_parser().parse_args
    with pytest.raises(SystemExit, match='^error: --data /does/not/exist: no train/ folder'):
        reproduce.main(parse(['--data', '/does/not/exist', '--budget', 'smoke']))
    # the default output is the work folder's, not results/: a sitting stopped at once writes an empty table there
    monkeypatch.setattr(reproduce, 'execute', lambda run, records, data: False)
    reproduce.main(parse(['--data', str(image_folder), '--budget', 'smoke', '--work_dir', str(tmp_path / 'work')]))
    assert (tmp_path / 'work' / 'results' / 'results.md').exists()
    # the committed records, copied elsewhere, are of Tiny-ImageNet-50: refused for another data set, in one line
    shutil.copytree(committed, tmp_path / 'copy')
    with pytest.raises(SystemExit, match=r'^error: .*\.json is a record of another data set \(.*\) than --data'):
        reproduce.main(parse(['--data', str(image_folder), '--output_dir', str(tmp_path / 'copy')]))
    assert snapshot(committed) == before


def test_gpu_budget_stops_at_its_time_limit_reports_and_a_rerun_continues(image_folder, tmp_path, monkeypatch, capsys):
    """--max_minutes: at the deadline no further run starts (one in progress would checkpoint as on a signal); the
    report names what finished and what did not; the same command without the limit finishes the rest, skipping the
    finished runs. The GPU budget's plan, with a model and batch that fit the tiny data set on the CPU."""
    monkeypatch.setitem(reproduce.BUDGETS, 'gpu', dict(
        reproduce.BUDGETS['gpu'], pretrain_epochs=2, finetune_epochs=1, batch_size=4, num_workers=0,
        model_flags=['--decoder_dim', '32', '--decoder_depth', '1']))
    argv = ['--data', str(image_folder), '--output_dir', str(tmp_path / 'results'), '--work_dir',
            str(tmp_path / 'work'), '--budget', 'gpu', '--img_size', '32']
    now, real_execute = [0.0], reproduce.execute

    def execute_then_the_clock_passes_the_limit(*args):
        finished = real_execute(*args)
        now[0] += 3600  # the first run took an hour
        return finished

    monkeypatch.setattr(reproduce, 'clock', lambda: now[0])
    monkeypatch.setattr(reproduce, 'execute', execute_then_the_clock_passes_the_limit)
    reproduce.main(reproduce.get_args_parser().parse_args(argv + ['--max_minutes', '8']))
    monkeypatch.setattr(reproduce, 'execute', real_execute)
    out = capsys.readouterr().out
    runs = tmp_path / 'results' / 'runs'
    assert [path.stem for path in runs.glob('*.json')] == ['random-init-frozen']  # the one begun before the deadline
    assert 'finished (1 of 18): random-init-frozen' in out and 'unfinished: mae, mae-frozen, dbot,' in out
    first = (runs / 'random-init-frozen.json').read_text()
    reproduce.main(reproduce.get_args_parser().parse_args(argv))
    assert 'unfinished: none' in capsys.readouterr().out
    assert (runs / 'random-init-frozen.json').read_text() == first  # skipped, not run again


def test_a_signal_between_runs_ends_the_sitting_in_one_line_and_an_unreadable_folder_too(image_folder, tmp_path,
                                                                                         monkeypatch):
    """Between its runs reproduce.py has nothing to save: a signal there ends it at once, in one line (a signal inside
    a run checkpoints that run, as test_smoke_protocol shows)."""
    monkeypatch.setattr(reproduce, 'execute', lambda *args: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(SystemExit, match='^error: stopped by SIGINT where there is nothing to save'):
        reproduce.main(protocol(image_folder, tmp_path))
    assert signal.getsignal(signal.SIGINT) is not runtime.on_signal
    monkeypatch.undo()

    def unreadable(self, pattern):  # what a folder this user may not read gives (as root, chmod cannot show it)
        raise PermissionError(13, 'Permission denied', str(self / 'class_0'))

    monkeypatch.setattr(Path, 'rglob', unreadable)
    with pytest.raises(SystemExit, match=r'^error: --data .*: cannot read .*class_0 \(Permission denied\)$'):
        reproduce.main(protocol(image_folder, tmp_path / 'second'))
