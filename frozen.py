"""
Evaluation of a frozen encoder (finetune.py --mode knn and --mode frozen): its features of every training and
validation image, computed once and cached; the weighted k-NN vote on them (as DINO); and a linear classifier trained
on them in seconds (MAE §A.4's probe, on one centre view per image).
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from tqdm import tqdm

import checkpoints
import data
import runtime
import train


def cached_features(model, train_set, val_set, key, path, run):
    """Train and val features of the frozen encoder in `model` (a finetune.Classifier), computed once: kept in `path`
    with `key`, what they are of, so that a rerun on the same encoder and images reads them back. A cache of other
    features is replaced; a damaged one (a copy cut short, a foreign file) is rebuilt, with a warning. Rank 0 reads
    and writes the cache; under several processes every rank extracts its shard. -> (train features, labels, val
    features, labels) on rank 0; None on the others when rank 0 read them from the cache."""
    cached = read_cache(path, key, run.device) if run.is_main else None
    if runtime.max_over_ranks(cached is not None):  # one decision for all ranks: rank 0's
        return cached
    features = [*extract_features(model, train_set, run, 'train'), *extract_features(model, val_set, run, 'val')]
    if run.is_main:
        checkpoints.save_checkpoint(dict(key=key, features=features), path)
    return features


def read_cache(path, key, device):
    if not path.exists():
        return None
    try:
        cached = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises for a damaged file, the cure is to rebuild it
        print(f'warning: rebuilding {path}, which cannot be read ({" ".join(str(e).split())[:120]})', file=sys.stderr)
        return None
    return cached['features'] if isinstance(cached, dict) and cached.get('key') == key else None


@torch.no_grad()
def extract_features(classifier, dataset, run, split):
    """Frozen features of every readable image of `dataset` (an EvaluationImageFolder, its evaluation view), in its
    order: (N, D) float32 and (N,) labels, on every rank. Each rank computes its shard's (data.Shard), and the shards
    are put back in the data set's order, so that any number of processes gives the same features."""
    classifier.eval()
    loader = data.evaluation_loader(dataset, run.args.batch_size, run.args.num_workers, run.rank, run.world_size)
    features, labels = [torch.zeros(0, classifier.head.in_features)], [torch.zeros(0, dtype=torch.long)]
    # outside a terminal, a line a minute rather than a fragment per batch
    for batch in tqdm(loader, desc=f'{split} features', disable=not run.is_main,
                      mininterval=0.1 if runtime.in_a_terminal() else 60):
        if batch is not None:
            with run.autocast:
                features.append(classifier.features(batch[0].to(run.device)).float().cpu())
            labels.append(batch[1])
    kept = torch.tensor([i for i in loader.sampler if not data.unreadable(dataset)[i]], dtype=torch.long)
    shards = runtime.gather_from_ranks((torch.cat(features), torch.cat(labels), kept))
    order = torch.cat([shard[2] for shard in shards]).argsort()
    if not len(order):
        runtime.fail(f'no readable image in the {split} split of --data: every file failed to decode')
    return [torch.cat([shard[part] for shard in shards])[order].to(run.device) for part in (0, 1)]


def knn_evaluate(bank, bank_labels, queries, query_labels, num_classes, k, temperature):
    """Weighted k-NN on L2-normalised frozen features (as DINO): each of the k most cosine-similar training images
    votes for its class with weight exp(similarity / temperature). The weights are computed relative to the nearest
    neighbour's, in float64: the same vote up to a factor per query, which overflows at no temperature (exp(1 / 0.01)
    is beyond float32)."""
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    top1 = top5 = 0
    for start in range(0, len(queries), 256):
        similarity, neighbours = (queries[start:start + 256] @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(similarity), num_classes, device=bank.device, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[neighbours], ((similarity - similarity[:, :1]).double() / temperature).exp())
        predictions = votes.topk(min(5, num_classes), dim=1).indices
        truth = query_labels[start:start + 256]
        top1 += (predictions[:, 0] == truth).sum().item()
        top5 += (predictions == truth[:, None]).any(dim=1).sum().item()
    return dict(val_acc1=100 * top1 / len(queries), val_acc5=100 * top5 / len(queries))


def linear_on_features(train_x, train_y, val_x, val_y, num_classes, args):
    """--mode frozen's linear probe: a linear classifier on cached features, trained in seconds. The features are
    standardised by the training set's mean and std (MAE §A.4's BatchNorm without affine parameters, whose statistics
    on fixed features are exactly these), then SGD with momentum and a cosine schedule, as --mode linprobe. Unlike
    MAE's probe the features are of one centre view per image, computed once: no random crops or flips."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    trunc_normal_(head.weight, std=args.head_init_std) if args.head_init_std else nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    peak_lr = args.lr or args.blr * args.batch_size / 256
    optimizer = torch.optim.SGD(head.parameters(), lr=peak_lr, momentum=0.9, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = max(1, len(train_x) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = train.warmup_steps(args.warmup_epochs, args.epochs, steps_per_epoch)
    for step in range(total_steps):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
        for group in optimizer.param_groups:
            group['lr'] = train.lr_at(step, total_steps, warmup, peak_lr, args.min_lr)
        batch = order[step % steps_per_epoch * args.batch_size:][:args.batch_size]
        F.cross_entropy(head(train_x[batch]), train_y[batch]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        top5 = head(val_x).topk(min(5, num_classes), dim=1).indices
    return dict(val_acc1=100 * (top5[:, 0] == val_y).sum().item() / len(val_y),
                val_acc5=100 * (top5 == val_y[:, None]).any(dim=1).sum().item() / len(val_y))
