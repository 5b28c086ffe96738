"""Reliability of train.py: exact resume after SIGKILL, graceful stop, safe checkpoints, non-finite losses, bad input,
and DDP equivalence (2 gloo processes on CPU)."""

import argparse
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import data
import finetune
import frozen
import runtime
import train
from conftest import make_image_folder
from mae import MAE

HERE = Path(__file__).parent
COMMON = ['--model', 'vit_tiny', '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth',
          '1', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--warmup_epochs', '1', '--vis_every',
          '100', '--log_every', '1']


def flags(data, out, *extra):
    return ['--data', str(data), '--output_dir', str(out), *COMMON, *extra]


def run_in_process(data, out, *extra):
    train.main(train.get_args_parser().parse_args(flags(data, out, *extra)))


def logged(out, key='loss'):
    log = out / 'log.jsonl'
    return [json.loads(line)[key] for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope='module')
def images64(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images64'), per_class=32)  # 16 steps per epoch at batch 4


# 1. Exact resume ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('extra', [('--method', 'mae', '--epochs', '3'),
                                   ('--method', 'dbot', '--stage_epochs', '1,2')])  # killed across the boundary
def test_sigkill_then_the_same_command_gives_the_same_losses(images64, tmp_path, extra):
    command = [sys.executable, 'train.py']
    subprocess.run(command + flags(images64, tmp_path / 'straight', *extra), check=True, capture_output=True, cwd=HERE)
    expected = logged(tmp_path / 'straight')
    killed = tmp_path / 'killed'
    process = subprocess.Popen(command + flags(images64, killed, *extra), cwd=HERE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    while not (killed / 'checkpoint-last.pth').exists() and process.poll() is None:
        time.sleep(0.01)
    process.kill()  # SIGKILL, as soon as the first epoch's checkpoint is there
    process.wait()
    assert len(logged(killed)) < len(expected)  # it really was interrupted
    subprocess.run(command + flags(images64, killed, *extra), check=True, capture_output=True, cwd=HERE)
    assert logged(killed) == pytest.approx(expected, rel=1e-4)


# 2. Graceful stop --------------------------------------------------------------------------------------------------

# Call 1 of train.forward_backward in a run is flops_per_image's count at start-up; micro-steps are calls 2, 3, ...

def signal_at_call(monkeypatch, call, signum):
    """Send a real signal to this process from inside the call-th call of forward_backward."""
    calls, real = [0], train.forward_backward

    def forward_backward(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, 'forward_backward', forward_backward)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_exact_position_and_the_rerun_continues_exactly(image_folder, tmp_path, monkeypatch, signum):
    run_in_process(image_folder, tmp_path / 'straight', '--epochs', '2')
    signal_at_call(monkeypatch, 8, signum)  # epoch 1 (4 steps per epoch), step 2
    run_in_process(image_folder, tmp_path / 'stopped', '--epochs', '2')  # returns: exit code 0
    checkpoint = torch.load(tmp_path / 'stopped' / 'checkpoint-last.pth', weights_only=True)
    assert (checkpoint['epoch'], checkpoint['step']) == (1, 3)
    monkeypatch.undo()
    assert signal.getsignal(signum) is not runtime.on_signal  # the handlers are restored
    run_in_process(image_folder, tmp_path / 'stopped', '--epochs', '2')
    assert logged(tmp_path / 'stopped') == pytest.approx(logged(tmp_path / 'straight'), rel=1e-4)


def test_sigterm_to_a_running_process_exits_0_with_a_checkpoint(images64, tmp_path):
    process = subprocess.Popen([sys.executable, 'train.py'] + flags(images64, tmp_path, '--epochs', '50'), cwd=HERE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (tmp_path / 'log.jsonl').exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert 'stopped by a signal' in output
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert checkpoint['step'] > 0 and checkpoint['epoch'] < 50


def test_sigterm_to_the_process_group_with_loader_workers_exits_0_with_a_checkpoint(images64, tmp_path):
    """A scheduler's pre-emption or Ctrl-C signals every process of the group, loader workers too: they leave it to
    the main process, which checkpoints and stops them."""
    process = subprocess.Popen([sys.executable, 'train.py'] + flags(images64, tmp_path, '--epochs', '50',
                                                                     '--num_workers', '2'),
                               cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    while not (tmp_path / 'log.jsonl').exists() and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
    assert 'stopped by a signal' in output and 'Traceback' not in output
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert checkpoint['step'] > 0 and checkpoint['epoch'] < 50


@pytest.mark.parametrize('phase', ['data.build_training_images', 'train.build_model', 'train.flops_per_image'])
def test_a_signal_where_there_is_nothing_to_save_ends_the_run_at_once_in_one_line(image_folder, tmp_path, monkeypatch,
                                                                                   phase):
    """Before the training loop (data, model, FLOP counting) a signal ends the run now, in one line."""
    module, name = {'data': data, 'train': train}[phase.split('.')[0]], phase.split('.')[1]
    real = getattr(module, name)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)
    started = time.perf_counter()
    with pytest.raises(SystemExit, match='^error: stopped by SIGINT where there is nothing to save') as stop:
        run_in_process(image_folder, tmp_path, '--epochs', '1', '--vis_every', '1')
    assert '\n' not in str(stop.value.code) and time.perf_counter() - started < 30
    assert signal.getsignal(signal.SIGINT) is not runtime.on_signal  # the handlers are restored
    assert not (tmp_path / 'checkpoint-last.pth').exists()


def test_a_signal_while_the_last_checkpoint_is_written_lets_the_write_finish(image_folder, tmp_path, monkeypatch):
    """The end of a run waits for its last checkpoint, written in the background: a signal then must not cut the wait
    short, which would lose that save (and end the interpreter under the writing thread)."""
    real = checkpoints.save_checkpoint

    def signalled_while_written(state, path):
        if state['epoch'] == 2:  # the last epoch's: the main thread is waiting for it by now
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        real(state, path)

    monkeypatch.setattr(checkpoints, 'save_checkpoint', signalled_while_written)
    run_in_process(image_folder, tmp_path, '--epochs', '2')
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['epoch'] == 2
    assert len(logged(tmp_path)) == 2


@pytest.mark.parametrize('phase', ['frozen.extract_features', 'frozen.knn_evaluate', 'frozen.linear_on_features'])
def test_a_signal_in_frozen_evaluation_ends_it_at_once_in_one_line(image_folder, tmp_path, monkeypatch, phase):
    run_in_process(image_folder, tmp_path / 'pretrained', '--epochs', '1')
    real = getattr(frozen, phase.split('.')[1])

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(frozen, phase.split('.')[1], signalled)
    argv = ['--checkpoint', str(tmp_path / 'pretrained' / 'checkpoint-last.pth'), '--data', str(image_folder),
            '--mode', 'frozen', '--epochs', '2', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu',
            '--output_dir', str(tmp_path / 'frozen')]
    with pytest.raises(SystemExit, match='^error: stopped by SIGTERM where there is nothing to save'):
        finetune.main(finetune.get_args_parser().parse_args(argv))
    assert not (tmp_path / 'frozen' / 'log.jsonl').exists()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_a_leftover_distributed_environment_is_one_line_and_ctrl_c_stops_the_wait(image_folder, tmp_path):
    """RANK set without the rest of torchrun's variables is one line naming them; with all of them but no peer, the
    wait for the peer stops at Ctrl-C within seconds (it waited 30 minutes, deaf to signals); LOCAL_WORLD_SIZE=0
    does not matter to one process."""
    command = [sys.executable, 'train.py'] + flags(image_folder, tmp_path, '--epochs', '1')
    env = dict(os.environ, RANK='0', WORLD_SIZE='2', LOCAL_WORLD_SIZE='0')
    result = subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        'error: RANK is set in the environment but MASTER_ADDR, MASTER_PORT, LOCAL_RANK not: start the processes '
        'with torchrun, or unset RANK (a leftover of another job?) to run one process']
    env.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()), LOCAL_RANK='0')
    command = [sys.executable, 'train.py'] + flags(image_folder, tmp_path / 'waits', '--epochs', '1')
    process = subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.perf_counter() + 120
    while not (tmp_path / 'waits' / '.lock').exists() and time.perf_counter() < deadline:  # its handlers are set
        time.sleep(0.1)
    time.sleep(2)  # waiting for rank 1
    started = time.perf_counter()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert time.perf_counter() - started < 10 and process.returncode != 0
    assert err.strip().splitlines()[-1].startswith('error: stopped by SIGINT'), err[-2000:]


def test_a_missing_peer_is_named_after_the_set_up_time_out(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, 'SETUP_TIMEOUT', datetime.timedelta(seconds=2))
    for name, value in dict(RANK='1', WORLD_SIZE='2', LOCAL_RANK='1', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=r'^error: rank 1 of WORLD_SIZE 2 could not meet its peers at 127.0.0.1:\d+ '
                                         r'within 2 s'):
        run_in_process(image_folder, tmp_path, '--epochs', '1')


def test_an_error_in_a_loader_worker_is_one_line_and_leaves_no_worker_behind(image_folder, tmp_path, monkeypatch):
    """An augmentation that fails on one image in a worker (MAE's rand-m9-mstd0.5-inc1 under Pillow 13 did): one
    line; and the persistent workers, which ignore SIGTERM, do not keep the process from exiting."""
    def augment(image):  # the augmentation fails, not the decoding (an undecodable file is skipped, not an error)
        raise ValueError('no such posterize level')

    monkeypatch.setattr(data, 'pretrain_transform', lambda img_size: augment)
    with pytest.raises(SystemExit, match=r'^error: a data loader worker failed: ValueError: no such posterize level'):
        run_in_process(image_folder, tmp_path, '--epochs', '1', '--num_workers', '2')
    assert not [child for child in multiprocessing.active_children() if child.daemon]


# 3. No corrupt checkpoints ----------------------------------------------------------------------------------------

def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint-last.pth'
    checkpoints.save_checkpoint({'weights': torch.ones(3)}, path)

    def dies_half_way(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, 'save', dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint({'weights': torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)['weights'], torch.ones(3))


def test_truncated_foreign_or_mismatched_resume_is_refused(image_folder, tmp_path):
    run_in_process(image_folder, tmp_path / 'run', '--epochs', '1')
    good = (tmp_path / 'run' / 'checkpoint-last.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(good[:len(good) // 2])
    with pytest.raises(SystemExit, match='cannot read checkpoint .*truncated.pth'):
        run_in_process(image_folder, tmp_path / 'a', '--epochs', '2', '--resume', str(tmp_path / 'truncated.pth'))
    # the run's log is no checkpoint; nor is a file of pickled objects, which no advice may tell to unpickle
    torch.save({'args': datetime.date(2026, 1, 1)}, tmp_path / 'objects.pth')
    for wrong, reason in (('run/log.jsonl', 'neither a file of torch.save nor a .safetensors file'),
                          ('objects.pth', 'holds more than tensors and plain values')):
        with pytest.raises(SystemExit) as e:
            run_in_process(image_folder, tmp_path / 'e', '--epochs', '2', '--resume', str(tmp_path / wrong))
        assert reason in str(e.value.code) and 'weights_only' not in str(e.value.code)
    torch.save(timm.create_model('vit_tiny_patch16_224', pretrained=False).state_dict(), tmp_path / 'foreign.pth')
    with pytest.raises(SystemExit, match='not a checkpoint of this script'):
        run_in_process(image_folder, tmp_path / 'b', '--epochs', '2', '--resume', str(tmp_path / 'foreign.pth'))
    with pytest.raises(SystemExit, match=r"belongs to another run: its --model is vit_tiny, this run's is vit_small"):
        run_in_process(image_folder, tmp_path / 'c', '--epochs', '2', '--model', 'vit_small',
                       '--resume', str(tmp_path / 'run' / 'checkpoint-last.pth'))
    with pytest.raises(SystemExit, match=r"belongs to another run: its --decoder_dim is 32, this run's is 64"):
        run_in_process(image_folder, tmp_path / 'd', '--epochs', '2', '--decoder_dim', '64',
                       '--resume', str(tmp_path / 'run' / 'checkpoint-last.pth'))


def test_a_resumed_optimizer_keeps_its_moments_and_takes_this_runs_hyperparameters(image_folder, tmp_path):
    run_in_process(image_folder, tmp_path, '--epochs', '1')
    args = train.get_args_parser().parse_args(flags(image_folder, tmp_path, '--epochs', '2', '--weight_decay', '0.1',
                                                    '--betas', '0.8', '0.9'))
    train.validate_args(args)
    run = train.Run(args, 0, 1, torch.device('cpu'), nullcontext())
    checkpoints.read_resumed(run, ('model', 'optimizer'), train.ON_RESUME, train.ON_RESUME.identity(args))
    train.build_model(run)
    saved = run.ckpt['optimizer']
    checkpoints.restore_training(run, run.raw_model, run.optimizer)
    groups = run.optimizer.param_groups
    assert [g['weight_decay'] for g in groups] == [0.1, 0.0] and groups[0]['betas'] == (0.8, 0.9)
    assert saved['param_groups'][0]['weight_decay'] == 0.05  # the checkpoint's, which load_state_dict would restore
    assert torch.equal(run.optimizer.state_dict()['state'][0]['exp_avg'], saved['state'][0]['exp_avg'])


def another_value(action, value):
    """A different value the flag's declaration allows (the resume table's test changes every flag with it)."""
    if action.choices:
        return next(choice for choice in action.choices if choice != value)
    if isinstance(value, bool) or action.nargs == 0:
        return not value
    if isinstance(value, list):
        return value + value[-1:] if value else [1]
    if isinstance(value, (int, float)):
        return (value / 2 if value else 0.1) if isinstance(value, float) else value + 1
    return 'another'  # names and paths, given or not (None)


@pytest.mark.parametrize('script', [train, finetune])
def test_every_flag_changed_on_resume_is_refused_announced_or_accepted_as_its_class_says(script, capsys):
    """The resume table (flags.OnResume), walked over every flag of the parser: a flag added later is an identity
    flag until someone classifies it, and this test holds it to its class."""
    table, parser = script.ON_RESUME, script.get_args_parser()
    argv = ['--data', 'images'] + (['--checkpoint', 'none'] if script is finetune else [])
    args = parser.parse_args(argv)
    for action in parser._actions:
        if action.dest == 'help':
            continue
        changed = argparse.Namespace(**vars(args))
        setattr(changed, action.dest, another_value(action, getattr(args, action.dest)))
        for step in (0, 3):  # between epochs, and in the middle of one
            checkpoint = dict(args=vars(args), identity=table.identity(args), epoch=2, step=step)
            try:
                table.check(checkpoint, changed, table.identity(changed), Path('ckpt.pth'))
                outcome = 'announced' if f'--{action.dest} ' in capsys.readouterr().out else 'accepted'
            except SystemExit as e:
                outcome = 'refused'
                assert str(e.code).startswith('error: ') and f'--{action.dest} ' in str(e.code), e.code
            expected = ('accepted' if action.dest in table.free else 'announced' if action.dest in table.schedule
                        else ('refused' if step else 'announced') if action.dest in table.position else 'refused')
            assert outcome == expected, (action.dest, step, outcome)


def test_a_changed_batch_size_is_refused_mid_epoch_and_a_changed_lr_announced_and_followed(image_folder, tmp_path,
                                                                                            monkeypatch, capsys):
    signal_at_call(monkeypatch, 3, signal.SIGTERM)  # epoch 0, step 2
    run_in_process(image_folder, tmp_path, '--epochs', '2')
    monkeypatch.undo()
    with pytest.raises(SystemExit, match='stopped in the middle of epoch 0 with --batch_size 4: continue it with'):
        run_in_process(image_folder, tmp_path, '--epochs', '2', '--batch_size', '2')
    capsys.readouterr()
    run_in_process(image_folder, tmp_path, '--epochs', '2', '--blr', '3e-4')
    assert 'was trained with --blr 0.00015; this run continues with --blr 0.0003' in capsys.readouterr().out
    last_lr = json.loads((tmp_path / 'log.jsonl').read_text().splitlines()[0])['lr']  # step 3 of a 4-step warm-up
    assert last_lr == pytest.approx(3e-4 * 4 / 256 * 3 / 4, rel=1e-6)  # the new --blr's, not the checkpoint's


# 4. Non-finite losses ---------------------------------------------------------------------------------------------

def nan_at_calls(monkeypatch, calls_to_poison):
    calls, real = [0], train.forward_backward

    def forward_backward(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float('nan') if calls[0] in calls_to_poison else loss

    monkeypatch.setattr(train, 'forward_backward', forward_backward)


def test_nan_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    nan_at_calls(monkeypatch, {7})  # epoch 1, step 1
    with pytest.raises(SystemExit, match=r'NaN or infinite in epoch 1 at step 1 .*lower --blr.*the last good '
                                         r'checkpoint is .*checkpoint-last.pth'):
        run_in_process(image_folder, tmp_path, '--epochs', '3')
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['epoch'] == 1  # epoch 0's, intact
    assert len(logged(tmp_path)) == 1
    nan_at_calls(monkeypatch, {2})  # the first step (call 1 counts FLOPs): there is no checkpoint to name
    with pytest.raises(SystemExit, match=r'in epoch 0 at step 0 .*; no checkpoint had been written yet'):
        run_in_process(image_folder, tmp_path / 'first', '--epochs', '3')


def test_skip_nonfinite_skips_isolated_bad_steps(image_folder, tmp_path, monkeypatch):
    nan_at_calls(monkeypatch, {3})
    run_in_process(image_folder, tmp_path, '--epochs', '1', '--skip_nonfinite', '1')
    assert logged(tmp_path, 'skipped_steps') == [1]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in logged(tmp_path))
    nan_at_calls(monkeypatch, {2, 3})
    with pytest.raises(SystemExit, match='more than --skip_nonfinite 1'):
        run_in_process(image_folder, tmp_path / 'twice', '--epochs', '1', '--skip_nonfinite', '1')


# 5. Bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('extra,message', [
    (['--data', '/nonexistent'], 'no such folder'),
    (['--img_size', '36'], 'not divisible by --patch_size'),
    (['--mask_ratio', '0'], r'argument --mask_ratio: 0 is outside \(0, 1\)'),
    (['--method', 'dbot', '--stages', '0'], r'argument --stages: 0 is outside \[1, '),
    (['--method', 'mae', '--clip_weights', 'x.pth'], 'mae does not use it'),
    (['--method', 'dbot', '--mimic_weight', '2'], 'dbot does not use it'),
])
def test_bad_flags_are_one_clear_line(image_folder, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run_in_process(image_folder, tmp_path, *extra)


def test_bad_input_from_the_command_line_has_no_traceback(image_folder, tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = subprocess.run([sys.executable, 'train.py'] + flags(image_folder, tmp_path / 'a_file' / 'out'),
                            cwd=HERE, capture_output=True, text=True)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert 'a_file is a file, not a folder' in result.stderr


def test_unreadable_images_are_skipped_with_a_warning_and_each_counted_once(image_folder, tmp_path, capfd,
                                                                             monkeypatch):
    """A corrupt file, a truncated one, and a decompression bomb (an image beyond twice PIL's pixel limit, which PIL
    refuses with an error of its own), the first two next to each other in the folder's order, so that the image
    before them is replaced after trying both: each is counted once per epoch (the old count per attempt gave 4)."""
    broken = make_image_folder(tmp_path / 'broken', per_class=8)
    (broken / 'train' / 'class_0' / '30_garbage.jpg').write_bytes(b'not an image at all')
    whole = (broken / 'train' / 'class_0' / '3.jpg').read_bytes()
    (broken / 'train' / 'class_0' / '31_truncated.jpg').write_bytes(whole[:len(whole) // 3])
    Image.new('RGB', (100, 100)).save(broken / 'train' / 'class_1' / 'bomb.png')
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 4000)  # the 40 x 40 images pass; 100 x 100 is beyond 2 x 4000
    run_in_process(broken, tmp_path / 'out', '--epochs', '1')
    assert logged(tmp_path / 'out', 'skipped_images') == [3]
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith('warning: skipping unreadable image')]
    assert {Path(line.split()[4]).name for line in warnings} == {'30_garbage.jpg', '31_truncated.jpg', 'bomb.png'}
    assert 'Traceback' not in err
    run_in_process(broken, tmp_path / 'gpu_data', '--epochs', '2', '--gpu_data')  # decoded once, reported each epoch
    assert logged(tmp_path / 'gpu_data', 'skipped_images') == [3, 3]


# 6. DDP equivalence -----------------------------------------------------------------------------------------------

class ImageNoiseMAE(MAE):
    """MAE whose masks are a function of the images (one pixel per patch): however the batch is split over ranks and
    micro-batches, every image is masked as in the whole batch."""

    def forward(self, imgs, mask_ratio=0.75, noise=None, targets=None):
        p = self.patch_size
        return super().forward(imgs, mask_ratio, imgs[:, 0, p // 2::p, p // 2::p].flatten(1), targets)


def sgd_steps(model, micro_batches, world_size, accum_iter, steps=2):
    """Gradients of the last step and the weights after `steps` SGD steps of train.accumulate_gradients, with the
    model as train.wrapped gives it to the steps (DDP with train.py's settings when world_size > 1). (AdamW's first
    step is about lr * sign(g), which turns last-bit differences in near-zero gradients into whole updates: SGD,
    linear in the gradient, is the fair comparison.)"""
    run = SimpleNamespace(raw_model=model, world_size=world_size, device=torch.device('cpu'), teacher=None,
                          autocast=nullcontext(), args=SimpleNamespace(compile=None, accum_iter=accum_iter,
                                                                       mask_ratio=0.75))
    run.model = train.wrapped(run)
    optimizer, batches = torch.optim.SGD(model.parameters(), lr=0.1), iter(micro_batches)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        train.accumulate_gradients(run, batches)
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        optimizer.step()
    return grads, torch.cat([p.detach().flatten() for p in model.parameters()])


def tiny_model():
    torch.manual_seed(0)
    return ImageNoiseMAE(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_dim=32,
                         decoder_depth=1, decoder_heads=4)


def shares(imgs, rank=0, world_size=1, micro_batch=4):
    """The micro-batches of one process, or one rank's share of each."""
    share = micro_batch // world_size
    return [(micro[rank * share:(rank + 1) * share],) for micro in imgs.split(micro_batch)]


def _ddp_rank(rank, world_size, port, imgs, accum_iter, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    results[rank] = sgd_steps(tiny_model(), shares(imgs, rank, world_size), world_size, accum_iter)
    dist.destroy_process_group()


@pytest.mark.parametrize('accum_iter', [1, 2])
def test_two_gloo_processes_train_as_one_process_on_the_whole_batch(accum_iter):
    """Two optimizer steps (of two micro-batches each with --accum_iter 2), in DDP as train.py wraps the model
    (gradients as bucket views; a static graph without accumulation) against one process: the same gradients and
    weights."""
    imgs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = sgd_steps(tiny_model(), shares(imgs), 1, accum_iter)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(2, port, imgs, accum_iter, results), nprocs=2)
    for rank in range(2):
        for got, want in zip(results[rank], expected):  # the all-reduced gradients, then the updated weights
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(expected[1], torch.cat([p.detach().flatten() for p in tiny_model().parameters()]))


def test_torchrun_two_processes_on_cpu_end_to_end(image_folder, tmp_path):
    """Two corrupt files among 18: each epoch's skipped_images counts both, whichever rank's share holds them (rank 0
    counted its own only)."""
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data)
    for k in range(2):
        (data / 'train' / f'class_{k}' / 'corrupt.jpg').write_bytes(b'not an image')
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             'train.py'] + flags(data, tmp_path / 'out', '--epochs', '2', '--batch_size', '3'),
                            cwd=HERE, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert logged(tmp_path / 'out', 'skipped_images') == [2, 2]  # 9 images per rank, 3 batches of 3: all used


KILL_ONE_WORKER = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import train
torch.set_num_threads(1)  # two workers on two cores
steps, real = [0], train.forward_backward

def forward_backward(model, teacher, imgs, *args):
    steps[0] += len(imgs) != 2  # flops_per_image counts on two images; training batches here are of four
    first_attempt = os.environ['TORCHELASTIC_RESTART_COUNT'] == '0'
    if first_attempt and os.environ['RANK'] == '1' and steps[0] == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-epoch, with no chance to save anything
    return real(model, teacher, imgs, *args)

train.forward_backward = forward_backward
train.main(train.get_args_parser().parse_args())
'''


def test_torchrun_restarts_a_killed_worker_and_the_group_resumes_by_itself(images64, tmp_path):
    """torchrun --max-restarts 1: rank 1 is SIGKILLed in epoch 1 (8 steps per epoch); torchrun restarts both workers,
    which resume from the last checkpoint (epoch 1's start) and end with the uninterrupted run's losses."""
    def torchrun(out, kill_at):
        script = tmp_path / f'worker_{kill_at}.py'
        script.write_text(KILL_ONE_WORKER.format(repo=str(HERE), kill_at=kill_at))
        return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                               '--max-restarts', '1', str(script)] + flags(images64, out, '--epochs', '3'),
                              cwd=HERE, capture_output=True, text=True,
                              env=dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1'))  # as documented

    straight = torchrun(tmp_path / 'straight', kill_at=0)
    assert straight.returncode == 0, straight.stderr[-2000:]
    restarted = torchrun(tmp_path / 'restarted', kill_at=8 + 3)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert 'resumed from' in restarted.stdout + restarted.stderr  # the restarted group found the checkpoint
    assert logged(tmp_path / 'restarted') == pytest.approx(logged(tmp_path / 'straight'), rel=1e-4)
