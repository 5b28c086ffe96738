"""Beyond one process launcher (issue 35), from the user's side: `srun python train.py` under SLURM's environment
(no torchrun), a time-limit signal and the requeued command, ranks that see different output folders (node-local
disks), and a run continued on another number of processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import checkpoints
import runtime
import train
from conftest import make_image_folder

HERE = Path(__file__).parent
TINY = ['--model', 'vit_tiny', '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1',
        '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--warmup_epochs', '0', '--vis_every', '100',
        '--log_every', '1']


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def srun(argvs, port, **extra_env):
    """What `srun --ntasks N python train.py ...` starts: N processes that know only SLURM's variables."""
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                               'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    slurm = dict(SLURM_NTASKS=str(len(argvs)), SLURM_STEP_NUM_TASKS=str(len(argvs)), SLURM_JOB_NODELIST='localhost',
                 MASTER_PORT=str(port), **extra_env)
    return [subprocess.Popen([sys.executable, 'train.py', *argv], cwd=HERE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), **slurm))
            for rank, argv in enumerate(argvs)]


def finish(processes, timeout=600):
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in processes]


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('nodes'), per_class=16)  # 32 images: 4 steps at 2 x 4


def rows(out):
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


def test_srun_without_torchrun_trains_the_ranks_together_and_the_time_limit_signal_checkpoints(images, tmp_path):
    argv = ['--data', str(images), '--output_dir', str(tmp_path), *TINY, '--epochs', '2']
    results = finish(srun([argv, argv], free_port()))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert '2 process(es)' in results[0][1] and len(rows(tmp_path)) == 2
    assert json.loads((tmp_path / 'args.json').read_text())['world_size'] == 2
    assert all(key in rows(tmp_path)[0] for key in ('time', 'elapsed_s'))
    # the requeued job: a longer schedule, SIGUSR1 (#SBATCH --signal=USR1@...) to every task mid-run
    argv = ['--data', str(images), '--output_dir', str(tmp_path), *TINY, '--epochs', '200']
    processes = srun([argv, argv], free_port())
    deadline = time.time() + 300
    while len(rows(tmp_path)) < 3 and time.time() < deadline:
        time.sleep(0.5)
    for process in processes:
        process.send_signal(signal.SIGUSR1)
    results = finish(processes)
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:]
    assert 'stopped by a signal' in results[0][1]
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    assert len(checkpoint['ranks']) == 2 and checkpoint['epoch'] < 200


def test_ranks_that_find_different_checkpoints_are_refused_in_one_line(images, tmp_path):
    argv = lambda out: ['--data', str(images), '--output_dir', str(out), *TINY, '--epochs', '2']  # noqa: E731
    subprocess.run([sys.executable, 'train.py', *argv(tmp_path / 'node0'), '--epochs', '1'], cwd=HERE, check=True,
                   capture_output=True, env={k: v for k, v in os.environ.items() if k != 'RANK'})
    results = finish(srun([argv(tmp_path / 'node0'), argv(tmp_path / 'node1')], free_port()), timeout=300)
    for code, output in results:
        assert code != 0 and 'must be on a file system that every node sees' in output
        assert 'Traceback' not in output


def test_another_number_of_processes_between_epochs_is_announced(images, tmp_path):
    argv = ['--data', str(images), '--output_dir', str(tmp_path), *TINY]
    results = finish(srun([argv + ['--epochs', '1']] * 2, free_port()))
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:]
    alone = subprocess.run([sys.executable, 'train.py', *argv, '--epochs', '2'], cwd=HERE, capture_output=True,
                           text=True, env={k: v for k, v in os.environ.items() if not k.startswith('SLURM')})
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert 'was trained on 2 process(es); this run continues on 1: effective batch 8 -> 4' in alone.stdout
    assert len(rows(tmp_path)) == 2


def test_the_batch_script_itself_is_one_process(monkeypatch):
    """`sbatch --ntasks 4` runs its script once, with SLURM_NTASKS=4 and SLURM_PROCID=0 but no step of tasks: a
    `python train.py` there is one process, not rank 0 of 4 waiting for peers."""
    for name in ('RANK', 'WORLD_SIZE', 'SLURM_STEP_NUM_TASKS'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('SLURM_NTASKS', '4')
    monkeypatch.setenv('SLURM_PROCID', '0')
    assert runtime.init_distributed('cpu')[:2] == (0, 1)


def test_slurm_node_lists_give_their_first_host():
    assert runtime.first_host('gpu[03-05,09],cpu1') == 'gpu03'
    assert runtime.first_host('node7,node8') == 'node7' and runtime.first_host('a-b[001-004]') == 'a-b001'


def test_the_epoch_checkpoint_is_written_while_training_goes_on(images, tmp_path, monkeypatch):
    """Rank 0 writes the epoch's checkpoint in the background: the next epoch's steps run before it is on disk; the
    script still ends with every checkpoint and log row written."""
    written, stepped = [], []
    save, forward_backward = checkpoints.save_checkpoint, train.forward_backward

    def slow_save(state, path):
        time.sleep(2)
        save(state, path)
        written.append(time.perf_counter())

    def timed_forward_backward(*args, **kwargs):
        stepped.append(time.perf_counter())
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(checkpoints, 'save_checkpoint', slow_save)
    monkeypatch.setattr(train, 'forward_backward', timed_forward_backward)
    train.main(train.get_args_parser().parse_args(['--data', str(images), '--output_dir', str(tmp_path), *TINY,
                                                   '--epochs', '2']))
    steps_per_epoch = 8  # 32 images at batch 4; the first call counts FLOPs
    assert stepped[1 + steps_per_epoch] < written[0]  # epoch 1 began while epoch 0's checkpoint was being written
    assert torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)['epoch'] == 2 and len(rows(tmp_path)) == 2


KILL_ONCE = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import train
torch.set_num_threads(1)  # two workers on two cores
steps, real, marker = [0], train.forward_backward, {marker!r}

def forward_backward(model, teacher, imgs, *args):
    steps[0] += len(imgs) != 2  # flops_per_image counts on two images; training batches here are of four
    if os.environ['RANK'] == '1' and steps[0] == {kill_at} and not os.path.exists(marker):
        open(marker, 'w').close()
        os.kill(os.getpid(), signal.SIGKILL)  # a worker dies mid-epoch, with no chance to save anything
    return real(model, teacher, imgs, *args)

train.forward_backward = forward_backward
train.main(train.get_args_parser().parse_args())
'''


def two_nodes(images, out, kill_at):
    """Two elastic torchrun launchers on this host standing in for two nodes (one worker each), as documented:
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, --max-restarts 1."""
    script = out.parent / f'{out.name}_worker.py'
    script.write_text(KILL_ONCE.format(repo=str(HERE), kill_at=kill_at, marker=str(out.parent / f'{out.name}.killed')))
    port, env = free_port(), dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    launchers = [subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--nproc_per_node',
                                   '1', '--max-restarts', '1', '--rdzv_backend', 'c10d', '--rdzv_endpoint',
                                   f'localhost:{port}', '--rdzv_id', out.name, str(script), '--data', str(images),
                                   '--output_dir', str(out), *TINY, '--epochs', '3'],
                                  cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    return finish(launchers, timeout=900)


def test_two_nodes_recover_from_a_killed_worker_and_end_as_an_uninterrupted_run(images, tmp_path):
    straight = two_nodes(images, tmp_path / 'straight', kill_at=0)
    assert [code for code, _ in straight] == [0, 0], straight[0][1][-3000:]
    restarted = two_nodes(images, tmp_path / 'restarted', kill_at=4 + 2)  # epoch 1 (4 steps per epoch), step 2
    assert [code for code, _ in restarted] == [0, 0], restarted[0][1][-3000:] + restarted[1][1][-3000:]
    assert (tmp_path / 'restarted.killed').exists()
    assert [row['loss'] for row in rows(tmp_path / 'restarted')] == [row['loss'] for row in rows(tmp_path / 'straight')]
    final = [torch.load(tmp_path / name / 'checkpoint-last.pth', weights_only=True)['model'] for name in
             ('straight', 'restarted')]
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0])
