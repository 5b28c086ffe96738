"""Beyond one process launcher (issue 35), from the user's side: `srun python train.py` under SLURM's environment
(no torchrun), a time-limit signal and the requeued command, ranks that see different output folders (node-local
disks), and a run continued on another number of processes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoints
import flags
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


def srun(argvs, port, script='train.py', **extra_env):
    """What `srun --ntasks N python train.py ...` starts: N processes that know only SLURM's variables."""
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                                                               'MASTER_PORT', 'LOCAL_WORLD_SIZE')}
    slurm = dict(SLURM_NTASKS=str(len(argvs)), SLURM_STEP_NUM_TASKS=str(len(argvs)), SLURM_JOB_NODELIST='localhost',
                 MASTER_PORT=str(port), **extra_env)
    return [subprocess.Popen([sys.executable, str(script), *argv], cwd=HERE, stdout=subprocess.PIPE,
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


def test_a_rank_whose_peer_dies_or_freezes_ends_in_one_line(images, tmp_path):
    """A peer killed: the survivor's next collective fails, in one line. A peer frozen (SIGSTOP, a hung node): the
    survivor waits in C++ where no signal handler runs; a SIGTERM then ends it after the grace period, in one line."""
    script = tmp_path / 'grace.py'  # train.py with a short grace, so that the test need not wait a minute
    script.write_text(f'import sys; sys.path.insert(0, {str(HERE)!r})\nimport runtime, train\n'
                      f'runtime.STOP_GRACE_SECONDS = 2\ntrain.main(train.get_args_parser().parse_args())\n')
    for how in (signal.SIGKILL, signal.SIGSTOP):
        out = tmp_path / how.name
        ranks = srun([['--data', str(images), '--output_dir', str(out), *TINY, '--epochs', '1000']] * 2, free_port(),
                     script)
        while not (out / 'log.jsonl').exists() or not rows(out):  # training together
            assert ranks[0].poll() is None, ranks[0].stdout.read()
            time.sleep(0.2)
        ranks[1].send_signal(how)
        if how == signal.SIGSTOP:
            time.sleep(1)
            ranks[0].send_signal(signal.SIGTERM)
        code, output = finish(ranks[:1], timeout=60)[0]
        ranks[1].kill()
        ranks[1].wait()
        errors = [line for line in output.splitlines() if line.startswith('error: ')]
        assert code == 1 and 'Traceback' not in output and len(errors) == 1, output[-3000:]
        assert ('lost another rank' if how == signal.SIGKILL else 'did not stop within 2 s of SIGTERM') in errors[0]


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


def test_two_static_launchers_train_as_one_node_of_two_processes(images, tmp_path):
    """The static form (--node_rank, --master_addr, --master_port), one launcher per node: the same losses and the
    same final weights, bit for bit, as one launcher of two processes."""
    def launch(out, *launcher_flags):
        return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *launcher_flags, 'train.py', '--data',
                                 str(images), '--output_dir', str(out), *TINY, '--epochs', '2'], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS='1'))
    port = free_port()
    nodes = finish([launch(tmp_path / 'nodes', '--nnodes', '2', '--node_rank', str(rank), '--nproc_per_node', '1',
                           '--master_addr', 'localhost', '--master_port', str(port)) for rank in range(2)])
    one = finish([launch(tmp_path / 'one', '--standalone', '--nproc_per_node', '2')])
    assert [code for code, _ in nodes + one] == [0, 0, 0], nodes[0][1][-3000:] + one[0][1][-3000:]
    assert [row['loss'] for row in rows(tmp_path / 'nodes')] == [row['loss'] for row in rows(tmp_path / 'one')]
    final = [torch.load(tmp_path / name / 'checkpoint-last.pth', weights_only=True)['model'] for name in ('nodes', 'one')]
    assert all(torch.equal(final[0][key], final[1][key]) for key in final[0])


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



def test_a_scripts_one_line_error_is_written_whole_so_that_ranks_do_not_share_a_line(monkeypatch):
    """Ranks under torchrun write to one terminal: each error line goes out in one write, its newline included."""
    written = []
    monkeypatch.setattr(sys, 'stderr', SimpleNamespace(write=written.append, flush=lambda: None))
    with pytest.raises(SystemExit) as e:
        runtime.script(lambda: runtime.fail('--output_dir D holds another run'))
    assert e.value.code == 1 and written == ['error: --output_dir D holds another run\n']
    with pytest.raises(SystemExit) as e:  # argparse's own exit, and a clean one, pass as they are
        runtime.script(lambda: sys.exit(2))
    assert e.value.code == 2 and len(written) == 1


def pretrain(images, out, *extra):
    train.main(train.get_args_parser().parse_args(['--data', str(images), '--output_dir', str(out), *TINY, *extra]))


def refused(*args):
    with pytest.raises(SystemExit) as e:
        pretrain(*args)
    assert str(e.value.code).startswith('error: ') and '\n' not in str(e.value.code)
    return str(e.value.code)


DBOT = ['--method', 'dbot', '--stage_epochs', '1,3', '--save_every', '2']  # 4 epochs; stage 1 begins at epoch 1


@pytest.fixture
def writes(monkeypatch):
    """The files save_checkpoint writes, in order, each with the epoch its checkpoint is at."""
    written, save = [], checkpoints.save_checkpoint

    def recording(state, path):
        written.append((path.name, state.get('epoch')))
        save(state, path)
    monkeypatch.setattr(checkpoints, 'save_checkpoint', recording)
    return written


def test_save_every_writes_every_n_epochs_and_the_last_and_dbot_teachers_once_per_stage(images, writes, tmp_path,
                                                                                          monkeypatch):
    pretrain(images, tmp_path / 'straight', *DBOT)
    assert writes == [('teacher-stage0.pth', None), ('teacher-stage1.pth', None), ('checkpoint-last.pth', 2),
                      ('checkpoint-last.pth', 4)]
    final = torch.load(tmp_path / 'straight' / 'checkpoint-last.pth', weights_only=True)
    kept = torch.load(tmp_path / 'straight' / 'teacher-stage1.pth', weights_only=True)
    assert final['teacher'] == dict(teacher_file='teacher-stage1.pth', written=kept['written'])  # a name, no weights
    assert len(rows(tmp_path / 'straight')) == 4  # a row for every epoch, saved or not

    # killed before epoch 3 (from 0): the checkpoint of epoch 2 stands, and the row of the unsaved epoch 3 goes
    real = train.train_one_epoch
    monkeypatch.setattr(train, 'train_one_epoch',
                        lambda run, epoch: sys.exit('killed') if epoch == 3 else real(run, epoch))
    with pytest.raises(SystemExit):
        pretrain(images, tmp_path / 'killed', *DBOT)
    assert len(rows(tmp_path / 'killed')) == 3
    monkeypatch.setattr(train, 'train_one_epoch', real)
    del writes[:]
    pretrain(images, tmp_path / 'killed', *DBOT)
    assert writes == [('checkpoint-last.pth', 4)]  # the stage's teacher is not written again
    assert [row['loss'] for row in rows(tmp_path / 'killed')] == [row['loss'] for row in rows(tmp_path / 'straight')]
    again = torch.load(tmp_path / 'killed' / 'checkpoint-last.pth', weights_only=True)
    assert all(torch.equal(again['model'][key], value) for key, value in final['model'].items())


def test_a_rewind_is_the_folders_position_at_once_however_its_path_is_spelled(images, tmp_path, monkeypatch):
    """--resume of the run's own checkpoint-epoch3.pth (dBOT, stage 1), through a link to the folder, killed before
    its next save: the plain command then continues from the rewound position, with the stage's teacher file as
    it was, and ends as the uninterrupted run."""
    out, run_flags = tmp_path / 'run', [*DBOT, '--save_epochs', '1,3']
    pretrain(images, out, *run_flags)
    straight = [row['loss'] for row in rows(out)]
    (tmp_path / 'link').symlink_to(out)
    real = train.train_one_epoch
    monkeypatch.setattr(train, 'train_one_epoch',
                        lambda run, epoch: sys.exit('killed') if epoch == 3 else real(run, epoch))
    with pytest.raises(SystemExit):
        pretrain(images, out, *run_flags, '--resume', str(tmp_path / 'link' / 'checkpoint-epoch3.pth'))
    monkeypatch.setattr(train, 'train_one_epoch', real)
    assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch'] == 3 and len(rows(out)) == 3
    pretrain(images, out, *run_flags)
    assert [row['loss'] for row in rows(out)] == straight


def test_the_same_resume_command_run_again_continues_what_it_began(images, tmp_path, monkeypatch, capsys):
    """--resume FILE begins a run from FILE. The same command run again after a stop (a requeued job, a rerun)
    continues the folder's checkpoint, rather than starting from FILE again, whether FILE is another folder's
    checkpoint or the run's own earlier one (a rewind); and once the run is done, it has nothing to do."""
    first, run_flags = tmp_path / 'first', [*DBOT, '--save_epochs', '1']
    pretrain(images, first, *run_flags)
    straight = [row['loss'] for row in rows(first)]
    command = [*run_flags, '--resume', str(first / 'checkpoint-epoch1.pth')]
    real = train.train_one_epoch
    for out in (tmp_path / 'moved', first):
        monkeypatch.setattr(train, 'train_one_epoch',
                            lambda run, epoch: sys.exit('killed') if epoch == 3 else real(run, epoch))
        with pytest.raises(SystemExit):
            pretrain(images, out, *command)
        trained = []
        monkeypatch.setattr(train, 'train_one_epoch', lambda run, epoch: trained.append(epoch) or real(run, epoch))
        assert torch.load(out / 'checkpoint-last.pth', weights_only=True)['epoch'] == 2  # --save_every 2
        capsys.readouterr()
        pretrain(images, out, *command)
        said = capsys.readouterr().out
        assert trained == [2, 3] and 'is this run begun from --resume' in said
        assert ('to rewind to' if out == first else 'to begin from') in said
        assert [row['loss'] for row in rows(out)] == straight
        pretrain(images, out, *command)
        assert 'nothing to do' in capsys.readouterr().out and [row['loss'] for row in rows(out)] == straight


def test_the_command_of_every_start_of_a_run_continues_it(images, tmp_path, capsys):
    """A run begun from another folder's file through a link, lengthened by --resume of its own checkpoint-last.pth,
    then rewound, both through links from outside its folder: each of these commands, run again later (the first
    link re-pointed meanwhile), continues the run."""
    pretrain(images, tmp_path / 'a', '--epochs', '1')
    latest, mine, rewound, out = (tmp_path / name for name in ('latest.pth', 'mine.pth', 'rewound.pth', 'b'))
    latest.symlink_to(tmp_path / 'a' / 'checkpoint-last.pth')
    mine.symlink_to(out / 'checkpoint-last.pth')
    rewound.symlink_to(out / 'checkpoint-epoch2.pth')
    starts = [['--epochs', '2', '--save_epochs', '2', '--resume', str(latest)],
              ['--epochs', '3', '--resume', str(mine)],
              ['--epochs', '4', '--resume', str(rewound)]]  # a rewind to epoch 2
    for start in starts:
        capsys.readouterr()
        pretrain(images, out, *start)
    assert 'note: rewinding' in capsys.readouterr().out and [row['epoch'] for row in rows(out)] == [0, 1, 2, 3]
    shutil.copy(latest, tmp_path / 'copy.pth')
    latest.unlink()
    latest.symlink_to(tmp_path / 'copy.pth')
    for start in starts:
        capsys.readouterr()
        pretrain(images, out, *start[2:], '--epochs', '4')
        assert 'nothing to do' in capsys.readouterr().out and len(rows(out)) == 4


def test_a_file_of_another_folder_that_did_not_begin_the_run_is_refused(images, tmp_path):
    """--resume of a file that did not begin the folder's run would overwrite it and splice the logs, even with the
    same flags (two seeds share them), and so would the command of a run whose checkpoints predate begun_from."""
    for seed in ('0', '1'):
        pretrain(images, tmp_path / seed, '--epochs', '1', '--seed', seed)
    before = (tmp_path / '1' / 'checkpoint-last.pth').read_bytes()
    message = refused(images, tmp_path / '1', '--epochs', '2', '--seed', '1', '--resume',
                      str(tmp_path / '0' / 'checkpoint-last.pth'))
    assert 'holds another run' in message and 'drop --resume' in message
    assert (tmp_path / '1' / 'checkpoint-last.pth').read_bytes() == before
    command = ['--epochs', '2', '--resume', str(tmp_path / '0' / 'checkpoint-last.pth')]
    pretrain(images, tmp_path / 'older', *command)
    checkpoint = torch.load(tmp_path / 'older' / 'checkpoint-last.pth', weights_only=True)
    del checkpoint['begun_from']
    torch.save(checkpoint, tmp_path / 'older' / 'checkpoint-last.pth')
    assert 'holds another run' in refused(images, tmp_path / 'older', *command)
    # any checkpoint of another run, not only its checkpoint-last.pth, and a link that loops, in one line
    pretrain(images, tmp_path / 'kept', '--epochs', '1', '--seed', '1', '--save_epochs', '1')
    (tmp_path / 'kept' / 'checkpoint-last.pth').unlink()
    kept = (tmp_path / 'kept' / 'checkpoint-epoch1.pth').read_bytes()
    assert 'checkpoint-epoch1.pth' in refused(images, tmp_path / 'kept', *command)
    assert 'no checkpoint-last.pth' in refused(images, tmp_path / 'kept', '--epochs', '1')  # a fresh start too
    assert (tmp_path / 'kept' / 'checkpoint-epoch1.pth').read_bytes() == kept
    pretrain(images, tmp_path / 'kept', '--epochs', '2', '--seed', '1', '--resume',
             str(tmp_path / 'kept' / 'checkpoint-epoch1.pth'))  # as the refusal says: the run continues
    assert [row['epoch'] for row in rows(tmp_path / 'kept')] == [0, 1]
    (tmp_path / 'loop').symlink_to(tmp_path / 'loop')
    assert 'a link that loops' in refused(images, tmp_path / '1', '--resume', str(tmp_path / 'loop'))


def test_a_run_begun_in_a_folder_with_another_runs_log_keeps_none_of_its_rows(images, tmp_path):
    """A folder whose checkpoints are gone but whose log is left (a run deleted, or killed before its first save):
    a run begun there from another folder's file logs its own rows only, as in an empty folder."""
    pretrain(images, tmp_path / 'source', '--epochs', '1')
    pretrain(images, tmp_path / 'empty', '--epochs', '2', '--resume', str(tmp_path / 'source' / 'checkpoint-last.pth'))
    pretrain(images, tmp_path / 'left', '--epochs', '2', '--seed', '1')
    for name in ('checkpoint-last.pth', 'args.json'):
        (tmp_path / 'left' / name).unlink()
    pretrain(images, tmp_path / 'left', '--epochs', '2', '--resume', str(tmp_path / 'source' / 'checkpoint-last.pth'))
    for log in ('log.jsonl', 'steps.jsonl'):
        lines = [(tmp_path / out / log).read_text().splitlines() for out in ('left', 'empty')]
        logged = [[(row['epoch'], row['loss']) for row in map(json.loads, each)] for each in lines]
        assert logged[0] == logged[1] and logged[0]


def test_the_same_relative_command_continues_the_run_after_its_project_folder_moved(images, tmp_path, monkeypatch,
                                                                                      capsys):
    """Paths relative to the working folder, typed again after the project folder moved (or on a node that mounts
    it elsewhere): begun from another folder's file, or rewound to its own, the run continues."""
    project = tmp_path / 'project'
    project.mkdir()
    monkeypatch.chdir(project)
    pretrain(images, 'source', '--epochs', '1')
    starts = [['--epochs', '2', '--save_epochs', '2', '--resume', 'source/checkpoint-last.pth'],
              ['--epochs', '3', '--resume', 'run/checkpoint-epoch2.pth']]  # a rewind
    for start in starts:
        pretrain(images, 'run', *start)
    project.rename(tmp_path / 'moved')
    monkeypatch.chdir(tmp_path / 'moved')
    for start in starts:
        capsys.readouterr()
        pretrain(images, 'run', *start, '--epochs', '3')
        assert 'nothing to do' in capsys.readouterr().out and len(rows(Path('run'))) == 3


def test_a_checkpoints_teacher_file_must_be_the_one_it_trained_with_and_older_checkpoints_still_resume(
        images, tmp_path):
    first = tmp_path / 'first'
    pretrain(images, first, *DBOT, '--epochs', '2', '--stage_epochs', '1,1')  # ends in stage 1
    saved = torch.load(first / 'checkpoint-last.pth', weights_only=True)
    # continued from another folder: the new folder gets a teacher file of its own, which its checkpoints name
    pretrain(images, tmp_path / 'moved', *DBOT, '--resume', str(first / 'checkpoint-last.pth'))
    assert torch.load(tmp_path / 'moved' / 'checkpoint-last.pth', weights_only=True)['teacher']['teacher_file'] == \
        'teacher-stage1.pth' and (tmp_path / 'moved' / 'teacher-stage1.pth').is_file()
    # a teacher file written again since (another run's, a rewound run's) is refused, as is a missing one
    teacher = first / 'teacher-stage1.pth'
    other = dict(torch.load(teacher, weights_only=True), written='another write')
    shutil.copy(teacher, tmp_path / 'teacher.bak')
    torch.save(other, teacher)
    assert 'is not the teacher' in refused(images, first, *DBOT)
    teacher.unlink()
    assert 'which is not there' in refused(images, first, *DBOT)
    # a checkpoint of format 1 holds the teacher's weights itself: it resumes, and names a file from then on
    shutil.copy(tmp_path / 'teacher.bak', teacher)
    torch.save(dict(saved, format=1, teacher=torch.load(teacher, weights_only=True)['model']),
               first / 'checkpoint-last.pth')
    pretrain(images, first, *DBOT)
    assert 'teacher_file' in torch.load(first / 'checkpoint-last.pth', weights_only=True)['teacher']


class FakeSummaryWriter:
    """torch.utils.tensorboard's SummaryWriter as train.py calls it, without the tensorboard package."""
    made = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, {}, False
        self.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_tensorboard_writes_the_logs_numbers_and_is_refused_in_one_line_without_the_package(images, tmp_path,
                                                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # not installed: import raises ImportError
    assert 'pip install tensorboard' in refused(images, tmp_path, '--tensorboard')
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    pretrain(images, tmp_path, '--epochs', '2', '--tensorboard')
    pretrain(images, tmp_path, '--epochs', '3', '--tensorboard')  # resumed: purges what comes after its checkpoint
    first, resumed = FakeSummaryWriter.made
    assert first.log_dir == tmp_path / 'tensorboard' and first.closed and resumed.closed
    per_epoch = 8  # 32 images, batch 4, one process
    assert (first.purge_step, resumed.purge_step) == (1, 2 * per_epoch + 1)  # the first step not yet taken
    assert first.scalars['epoch/loss'] + resumed.scalars['epoch/loss'] == [(per_epoch * (row['epoch'] + 1), row['loss'])
                                                                           for row in rows(tmp_path)]
    assert [step for step, _ in first.scalars['steps/loss']] == list(range(1, 2 * per_epoch + 1))  # --log_every 1
    assert 'epoch/elapsed_s' in first.scalars and 'epoch/time' not in first.scalars


FAKE_SRUN = '''#!{python}
"""srun as the batch script calls it: its options skipped, SLURM_NTASKS tasks of the command with a step's variables,
the signals srun forwards passed to every task, the exit status the worst task's."""
import os, signal, subprocess, sys
command = sys.argv[1:]
while command[0].startswith('-'):
    command = command[1:]
tasks, per_node = int(os.environ['SLURM_NTASKS']), int(os.environ['SLURM_NTASKS_PER_NODE'])
processes = [subprocess.Popen(command, env=dict(os.environ, SLURM_STEP_NUM_TASKS=str(tasks), SLURM_PROCID=str(rank),
                                                SLURM_LOCALID=str(rank % per_node), SLURM_NODEID=str(rank // per_node)))
             for rank in range(tasks)]
for forwarded in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
    signal.signal(forwarded, lambda signum, frame: [p.send_signal(signum) for p in processes])
sys.exit(max(p.wait() for p in processes))
'''


@pytest.mark.parametrize('nodes', [1, 2])
def test_the_documented_sbatch_script_trains_the_tasks_together_and_requeues_at_the_time_limit(images, tmp_path,
                                                                                              nodes):
    """docs/train.sbatch run as sbatch runs it (the job's SLURM variables; srun and scontrol stand-ins on PATH): its
    tasks train as one group; the time-limit warning (USR1 to the batch shell) requeues the job and the tasks save;
    the requeued job continues to the end."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text(FAKE_SRUN.format(python=sys.executable))
    # the stand-in scontrol also counts the tasks still running when the job is requeued
    (bin_dir / 'scontrol').write_text(f'#!/bin/sh\necho "$@" $(pgrep -fc "train.py --data") >> {tmp_path / "scontrol.log"}\n')
    for tool in ('srun', 'scontrol'):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')}
    env.update(PATH=f'{bin_dir}:{Path(sys.executable).parent}:{env["PATH"]}', SLURM_JOB_ID='4242',
               SLURM_NNODES=str(nodes), SLURM_NTASKS='2', SLURM_NTASKS_PER_NODE=str(2 // nodes),
               SLURM_JOB_NODELIST='localhost', MASTER_PORT=str(free_port()), OMP_NUM_THREADS='1')
    out = tmp_path / 'run'
    argv = ['bash', str(HERE / 'docs' / 'train.sbatch'), '--data', str(images), '--output_dir', str(out), *TINY,
            '--epochs', '4']
    job = subprocess.Popen(argv, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not (out / 'log.jsonl').exists() or not rows(out):
        assert job.poll() is None, job.stdout.read()
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0 and 'Traceback' not in output, output[-3000:]
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242 0\n'  # once the tasks have saved and ended
    assert json.loads((out / 'args.json').read_text())['world_size'] == 2
    assert len(rows(out)) < 4
    requeued = subprocess.run(argv, cwd=HERE, env=dict(env, MASTER_PORT=str(free_port())), capture_output=True,
                              text=True, timeout=600)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert [row['epoch'] for row in rows(out)] == list(range(4))


def test_an_srun_tasks_loader_workers_are_its_own_cores_and_torchruns_processes_share_theirs(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)))
    for name in ('SLURM_STEP_NUM_TASKS', 'SLURM_CPUS_PER_TASK', 'SLURM_NTASKS_PER_NODE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert flags.default_workers() == 2  # torchrun: four processes share the eight cores
    monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '8')
    monkeypatch.setenv('SLURM_CPUS_PER_TASK', '8')
    assert flags.default_workers() == 8  # srun bound the task to its eight cores: not divided again
