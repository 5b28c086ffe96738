"""The GPU path, emulated on the CPU: bf16 autocast and torch.compile for every method, per-rank positions when a
multi-process run stops mid-epoch, the stop vote, FLOP counts for MFU, host syncs in the step loop, and resuming a
checkpoint on another kind of device."""

import json
import os
import signal
import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import finetune
import flags
import flops
import mae
import mrmae
import runtime
import teachers
import train
from conftest import make_image_folder

TINY = ['--model', 'vit_tiny', '--img_size', '32', '--patch_size', '8', '--decoder_dim', '32', '--decoder_depth', '1',
        '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--warmup_epochs', '1', '--vis_every', '100']


def run(data, out, *extra):
    train.main(train.get_args_parser().parse_args(['--data', str(data), '--output_dir', str(out), *TINY, *extra]))
    return [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]


# 1. bf16 autocast and torch.compile ----------------------------------------------------------------------------------

def is_flop_count(imgs):
    return len(imgs) == 2  # train.flops_per_image counts on two images; these tests train on batches of four


def record_autocast(monkeypatch):
    """The autocast context of every training micro-step, as train.py hands it to forward_backward."""
    seen, real = [], train.forward_backward

    def forward_backward(model, teacher, imgs, mask_ratio, autocast, *args):
        if not is_flop_count(imgs):
            seen.append(getattr(autocast, 'fast_dtype', None))
        return real(model, teacher, imgs, mask_ratio, autocast, *args)

    monkeypatch.setattr(train, 'forward_backward', forward_backward)
    return seen


@pytest.mark.parametrize('method,extra', [
    ('mae', []), ('mcmae', ['--patch_size', '8']), ('dbot', ['--stage_epochs', '1,1']),
    ('mrmae', ['--teacher', 'clip+dino']), ('mrmcmae', ['--teacher', 'clip+dino'])])
def test_every_method_trains_under_bf16_autocast_on_the_cpu(image_folder, tmp_path, monkeypatch, standin, method,
                                                            extra):
    if method.startswith('mr'):
        extra += ['--clip_model', 'ViT-S-16', '--clip_weights', str(standin[0]), '--dino_model',
                  'vit_small_patch16_224.dino', '--dino_weights', str(standin[1])]
    seen = record_autocast(monkeypatch)
    rows = run(image_folder, tmp_path, '--method', method, '--precision', 'bf16', '--epochs', '2', *extra)
    assert len(seen) == 8 and set(seen) == {torch.bfloat16}  # every training micro-step ran under bf16 autocast
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(row['loss'])) for row in rows)
    if method == 'dbot':
        assert [row['stage'] for row in rows] == [0, 1]


@pytest.mark.parametrize('method,extra', [('dbot', ['--stage_epochs', '1,1']), ('mae', ['--epochs', '1'])])
def test_compiled_training_under_bf16_runs_and_a_stage_switch_does_not_recompile(image_folder, tmp_path, monkeypatch,
                                                                                  method, extra):
    """dBOT's teacher used to run under inference_mode, whose outputs the compiled student may not save for backward:
    the first compiled step died."""
    torch._dynamo.reset()
    monkeypatch.setitem(mae.VIT_SIZES, 'vit_tiny', dict(embed_dim=192, depth=2, num_heads=3))  # compiles in seconds
    real, steps = train.forward_backward, []

    def forward_backward(model, teacher, imgs, *args):
        loss = real(model, teacher, imgs, *args)
        if not is_flop_count(imgs):
            steps.append(loss)
            # compiled by the first step: from here on any recompilation raises (public API, torch 2.6 and newer)
            torch.compiler.set_stance('fail_on_recompile')
        return loss

    monkeypatch.setattr(train, 'forward_backward', forward_backward)
    try:
        rows = run(image_folder, tmp_path, '--method', method, '--precision', 'bf16', '--compile', *extra)
    finally:
        torch.compiler.set_stance('default')
    assert len(steps) > 1 and all(torch.isfinite(torch.tensor(row['loss'])) for row in rows)


def test_cuda_graph_steps_are_refused_where_they_would_fail_or_sum_gradients_wrongly(monkeypatch):
    """--compile reduce-overhead / max-autotune replay CUDA graphs: a GPU only, one micro-batch per step (graphs
    overwrite the gradients being accumulated, pytorch/pytorch#169545), one process; --compile alone is the default
    mode and max-autotune-no-cudagraphs records no graph."""
    parse = train.get_args_parser().parse_args
    assert parse(['--compile']).compile == 'default' and parse([]).compile is None
    for mode, extra, refusal in [('reduce-overhead', ['--device', 'cpu'], 'need a GPU'),
                                 ('max-autotune', ['--device', 'cpu'], 'need a GPU'),
                                 ('reduce-overhead', ['--accum_iter', '2'], 'pytorch/pytorch#169545')]:
        args = parse(['--compile', mode, *extra])
        args.device = 'cuda' if '--device' not in extra else args.device  # the device check itself comes first
        with pytest.raises(SystemExit, match=refusal):
            flags.check_compile(args)
    args = parse(['--compile', 'reduce-overhead'])
    args.device = 'cuda'
    flags.check_compile(args)  # one process, one micro-batch, a GPU: accepted
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SystemExit, match='DDP'):
        flags.check_compile(args)
    flags.check_compile(parse(['--compile', 'max-autotune-no-cudagraphs', '--device', 'cpu']))


def test_precision_defaults_to_bf16_on_cuda_and_fp32_on_cpu():
    parse = train.get_args_parser().parse_args
    warnings.simplefilter('ignore')  # without CUDA, torch warns that it disables a CUDA autocast
    args = parse(['--device', 'cpu'])
    assert runtime.autocast_for(args, torch.device('cpu')).__class__.__name__ == 'nullcontext'
    assert args.precision == 'fp32'
    args = parse(['--device', 'cuda'])
    autocast = runtime.autocast_for(args, torch.device('cuda'))
    assert args.precision == 'bf16' and autocast.fast_dtype == torch.bfloat16 and autocast.device == 'cuda'


# 2 and 6. Several processes: each rank's own position, and a stop agreed within seconds ------------------------------

def _rank_main(rank, world_size, port, argv, sigterm_at_step, vote_seconds, step_seconds, masks_file):
    """One torchrun-like rank of train.py. Rank 1 alone receives SIGTERM after sigterm_at_step training micro-steps
    (rank 0 learns of it through the vote); every step lasts at least step_seconds, like a large model's."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # two ranks on two cores: more threads each only fight over them
    runtime.STOP_VOTE_SECONDS = vote_seconds
    steps, real_step, real_sample = [0], train.forward_backward, mae.MAE.sample_mask

    def forward_backward(model, teacher, imgs, *args, **kwargs):
        if not is_flop_count(imgs):
            steps[0] += 1
            time.sleep(step_seconds)
            if rank == 1 and steps[0] == sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_step(model, teacher, imgs, *args, **kwargs)

    def sample_mask(self, *args, **kwargs):  # the first training mask this rank draws
        ids_keep, mask, ids_restore = real_sample(self, *args, **kwargs)
        if masks_file and self.training and not is_flop_count(mask) and not os.path.exists(f'{masks_file}.{rank}'):
            torch.save(mask, f'{masks_file}.{rank}')
        return ids_keep, mask, ids_restore

    train.forward_backward, mae.MAE.sample_mask = forward_backward, sample_mask
    train.main(train.get_args_parser().parse_args(argv))


def run_ranks(argv, sigterm_at_step=0, vote_seconds=5.0, step_seconds=0.0, masks_file=None, world_size=2,
              entry=_rank_main):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(entry, nprocs=world_size,
             args=(world_size, port, argv, sigterm_at_step, vote_seconds, step_seconds, masks_file))


def losses(out, key='loss'):
    return [json.loads(line)[key] for line in (out / 'log.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def images64(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('images64'), per_class=32)  # 8 steps per epoch: 2 ranks x 4


def test_two_ranks_stop_together_within_seconds_and_resume_each_from_its_own_position(images64, tmp_path):
    argv = lambda out: ['--data', str(images64), '--output_dir', str(out), *TINY, '--epochs', '2',
                        '--log_every', '1000']  # no log point inside an epoch: the vote alone must stop the run
    run_ranks(argv(tmp_path / 'straight'))
    # SIGTERM to rank 1 in epoch 1, step 2 (of 8); steps of 0.1 s and a vote every 0.2 s: the ranks must agree within
    # a few steps, where they used to vote only at log points (never, here) and finished the epoch.
    run_ranks(argv(tmp_path / 'stopped'), sigterm_at_step=8 + 3, vote_seconds=0.2, step_seconds=0.1)
    checkpoint = torch.load(tmp_path / 'stopped' / 'checkpoint-last.pth', weights_only=True)
    assert checkpoint['epoch'] == 1 and 3 <= checkpoint['step'] <= 6, checkpoint['step']
    ranks = checkpoint['ranks']
    assert len(ranks) == 2 and not torch.equal(ranks[0]['rng_state']['torch'], ranks[1]['rng_state']['torch'])
    assert ranks[0]['loss_sum'] != ranks[1]['loss_sum']
    run_ranks(argv(tmp_path / 'stopped'), masks_file=str(tmp_path / 'mask'))
    assert losses(tmp_path / 'stopped') == pytest.approx(losses(tmp_path / 'straight'), rel=1e-5)
    assert not torch.equal(torch.load(tmp_path / 'mask.0'), torch.load(tmp_path / 'mask.1'))  # their own masks


def _finetune_rank_main(rank, world_size, port, argv, sigterm_at_step, vote_seconds, step_seconds, unused):
    """As _rank_main, for finetune.py: rank 1 alone receives SIGTERM in its sigterm_at_step-th training forward."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    runtime.STOP_VOTE_SECONDS = vote_seconds
    steps, real_forward = [0], finetune.Classifier.forward

    def forward(self, imgs):
        if self.training:
            steps[0] += 1
            time.sleep(step_seconds)
            if rank == 1 and steps[0] == sigterm_at_step:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, imgs)

    finetune.Classifier.forward = forward
    finetune.main(finetune.get_args_parser().parse_args(argv))


def test_finetuning_on_two_ranks_resumes_each_from_its_own_position(images64, tmp_path):
    argv = lambda out: ['--checkpoint', 'none', '--model', 'vit_tiny', '--patch_size', '8', '--img_size', '32',
                        '--data', str(images64), '--output_dir', str(out), '--batch_size', '4', '--epochs', '2',
                        '--warmup_epochs', '1', '--num_workers', '0', '--device', 'cpu', '--crop_pct', '1.0']
    run_ranks(argv(tmp_path / 'straight'), entry=_finetune_rank_main)
    run_ranks(argv(tmp_path / 'stopped'), sigterm_at_step=8 + 3, vote_seconds=0.2, step_seconds=0.1,
              entry=_finetune_rank_main)
    checkpoint = torch.load(tmp_path / 'stopped' / 'checkpoint-last.pth', weights_only=True)
    assert checkpoint['epoch'] == 1 and 3 <= checkpoint['step'] <= 6, checkpoint['step']
    ranks = checkpoint['ranks']
    assert not torch.equal(ranks[0]['rng_state']['torch'], ranks[1]['rng_state']['torch'])
    run_ranks(argv(tmp_path / 'stopped'), entry=_finetune_rank_main)
    assert losses(tmp_path / 'stopped', 'train_loss') == pytest.approx(losses(tmp_path / 'straight', 'train_loss'),
                                                                       rel=1e-5)


def test_an_epoch_cut_in_several_processes_continues_only_with_as_many(image_folder, tmp_path):
    rows = run(image_folder, tmp_path, '--epochs', '1')
    checkpoint = torch.load(tmp_path / 'checkpoint-last.pth', weights_only=True)
    position = dict(rng_state=runtime.rng_states(torch.device('cpu')), loss_sum=torch.zeros(()), term_sums={})
    checkpoint.update(step=2, ranks=[position, position])
    torch.save(checkpoint, tmp_path / 'checkpoint-last.pth')
    with pytest.raises(SystemExit, match=r'stopped mid-epoch in a run of 2 process\(es\); continue it with 2'):
        run(image_folder, tmp_path, '--epochs', '2')
    assert len(rows) == 1


def test_stop_vote_spaces_votes_by_time_not_steps(monkeypatch):
    clock = iter([0.0, 0.5, 5.5, 10.5, 15.5])  # start, then a vote after step 1 (0.5 s a step) and ~5 s apart
    monkeypatch.setattr(runtime.time, 'perf_counter', lambda: next(clock))
    monkeypatch.setattr(runtime, 'max_over_ranks', lambda values: values)  # the ranks' common view
    vote, voted = runtime.StopVote(first_step=0, world_size=2), []
    for step in range(30):
        before = vote.last_step
        assert not vote.stops_after(step, steps_per_epoch=100)
        voted += [step + 1] if vote.last_step != before else []
    assert voted == [1, 11, 21]  # after the first step, then every 10 steps of 0.5 s
    monkeypatch.setattr(runtime, 'stop_requested', True)
    assert not vote.stops_after(29, 100) and vote.stops_after(30, 100)  # the next vote carries the signal


# 3 and 4. FLOPs for MFU -------------------------------------------------------------------------------------------

def test_flops_are_counted_again_when_a_stage_changes_the_teacher(image_folder, tmp_path):
    """--teacher_depth 0 (the ViT-L/H recipe): stage 0's teacher is an embedding, stage 1's a whole ViT."""
    rows = run(image_folder, tmp_path, '--method', 'dbot', '--teacher_depth', '0', '--stage_epochs', '1,1')
    size = mae.VIT_SIZES['vit_tiny']
    with torch.no_grad():
        teachers = [flops.count_flops(lambda: mae.ViT(32, 8, size['embed_dim'], depth, size['num_heads'])
                                      .forward_blocks(torch.randn(1, 3, 32, 32))) for depth in (0, size['depth'])]
    grown = (rows[1]['gflops_per_img'] - rows[0]['gflops_per_img']) * 1e9
    assert grown == pytest.approx(teachers[1] - teachers[0], rel=1e-4)


def test_a_clip_and_a_timm_teacher_of_one_architecture_count_the_same_flops(standin):
    args = train.get_args_parser().parse_args(['--method', 'mrmae', *TINY, '--clip_model', 'ViT-S-16', '--clip_weights',
                                               str(standin[0]), '--dino_model', 'vit_small_patch16_224.dino',
                                               '--dino_weights', str(standin[1])])
    counts = {}
    for name in ('clip', 'dino'):
        args.teacher = name
        teacher = mrmae.MRMAE.build_teacher(args)
        counts[name] = train.flops_per_image(mrmae.MRMAE.from_args(args, teacher), teacher, args, torch.device('cpu'))
    assert counts['clip'] == pytest.approx(counts['dino'], rel=1e-6)


# 5. No host sync in the step loop ----------------------------------------------------------------------------------

class HostSyncs(TorchDispatchMode):
    """Records the operations that make the host wait for a GPU: reading a value back (.item(), bool(), nonzero, ...)
    and building a tensor from host data (torch.tensor(list, device=...), new_tensor(list): a blocking copy on a GPU).
    On the CPU these run unnoticed; on a GPU each one drains the queue. A 0-dim lift (`mask[:, :k] = 0`, where
    PyTorch fills a scalar on the device) is not a copy, and is let through."""
    READ_BACK = {'_local_scalar_dense', 'nonzero', 'equal', 'is_nonzero', 'masked_select'}

    def __init__(self):
        super().__init__()
        self.active, self.seen, self.bar = False, [], None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        host_data = name in ('lift_fresh', 'lift_fresh_copy') and args[0].dim() > 0
        if self.active and (name in self.READ_BACK or host_data):
            self.seen.append((str(func), self.bar.n) if self.bar is not None else str(func))
        return func(*args, **(kwargs or {}))


def test_no_host_sync_between_log_points_with_gpu_data(image_folder, tmp_path, monkeypatch):
    """The step loop of an epoch (the progress bar's life) must not wait for the device before its one log point,
    after its last step (--log_every beyond the epoch)."""
    syncs, real_tqdm = HostSyncs(), train.tqdm

    class WatchedBar(real_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            syncs.active, syncs.bar = True, self

        def close(self):
            syncs.active = False
            super().close()

    monkeypatch.setattr(train, 'tqdm', WatchedBar)
    monkeypatch.setattr(runtime, 'in_a_terminal', lambda: True)  # a live bar counts the steps
    with syncs:
        rows = run(image_folder, tmp_path, '--gpu_data', '--epochs', '2', '--log_every', '1000')
    assert len(rows) == 2
    steps_per_epoch = 4  # 16 images, batch 4
    assert syncs.seen and all(step == steps_per_epoch for _, step in syncs.seen)  # the last step's log point only


def test_the_sync_detector_sees_what_it_must():
    syncs = HostSyncs()
    syncs.active = True
    with syncs:
        x = torch.ones(3)
        x.sum().item()
        x.new_tensor([1.0, 2.0])
    assert syncs.seen == ['aten._local_scalar_dense.default', 'aten.lift_fresh.default']


# 7. A checkpoint written on one kind of device, resumed on another -----------------------------------------------

def test_cpu_rng_state_restores_on_a_gpu_and_a_gpu_one_on_the_cpu(image_folder, tmp_path, monkeypatch):
    states = runtime.rng_states(torch.device('cpu'))  # as a CPU run saves them: no CUDA state
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda *a: pytest.fail('there is no CUDA state to restore'))
    expected = torch.rand(3)
    runtime.restore_rng_states(states, torch.device('cuda'))
    assert torch.equal(torch.rand(3), expected)  # the CPU stream continues exactly
    monkeypatch.undo()

    # A GPU run's mid-epoch checkpoint (a CUDA state beside the CPU ones) continues on the CPU.
    straight = [row['loss'] for row in run(image_folder, tmp_path / 'straight', '--epochs', '2')]
    steps, real = [0], train.forward_backward

    def forward_backward(model, teacher, imgs, *args):
        steps[0] += not is_flop_count(imgs)
        if steps[0] == 6 and not is_flop_count(imgs):  # 4 steps per epoch: epoch 1, step 2
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, teacher, imgs, *args)

    monkeypatch.setattr(train, 'forward_backward', forward_backward)
    run(image_folder, tmp_path / 'moved', '--epochs', '2')
    monkeypatch.undo()
    path = tmp_path / 'moved' / 'checkpoint-last.pth'
    checkpoint = torch.load(path, weights_only=True)
    assert (checkpoint['epoch'], checkpoint['step']) == (1, 2)
    checkpoint['ranks'][0]['rng_state']['cuda'] = torch.zeros(16, dtype=torch.uint8)
    torch.save(checkpoint, path)
    moved = [row['loss'] for row in run(image_folder, tmp_path / 'moved', '--epochs', '2')]
    assert moved == pytest.approx(straight, rel=1e-5)
