"""
dBOT: masked knowledge distillation with bootstrapped teachers.

Liu et al., "Exploring Target Representations for Masked Autoencoders", 2022. https://arxiv.org/abs/2209.03917
Only what the paper adds to MAE (mae.py): the decoder predicts a teacher's features instead of pixels, for every
token; the targets are a frozen teacher's whitened last-block tokens of the full image; the loss is SmoothL1 on the
hidden tokens and the cls token; and training runs in stages: at each boundary the student becomes the teacher and
starts again from a fresh initialisation. The first teacher is the student's own random initialisation.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae import VIT_SIZES, MAE, ViT, build_vit, denormalize, encoder_state_dict, read_encoder_state_dict, whiten
from mrmae import load_clip


class Teacher(ViT):
    """A frozen encoder of the student's architecture. Its output, the target, is the last block's output before the
    final norm (dBOT §3): the whitening in DBOT.forward_loss replaces that norm."""

    def forward(self, imgs):
        return self.forward_blocks(imgs)  # (B, 1 + L, D), cls included


class ClipTargets(nn.Module):
    """A CLIP image tower as the first teacher (dBOT §4.3): its last block's tokens, cls included, on the student's
    grid (loaded as for MR-MAE). The official code trains with it in a single stage (--stages 1: bootstrapping would
    discard what CLIP learned from its extra data) and with a negative cosine loss."""

    def __init__(self, clip, source):
        super().__init__()
        self.clip, self.source = clip, source  # source: the weights file and its SHA-256, kept in checkpoints

    def forward(self, imgs):
        return self.clip.last_two_blocks(self.clip.prepare(imgs))[1]  # (B, 1 + L, D)


class DBOT(MAE):
    default_stages = 2  # 2 for classification in the paper; 3 for detection and segmentation
    flags = ('teacher', 'teacher_depth', 'stages', 'stage_epochs', 'clip_model', 'clip_weights', 'clip_quick_gelu')

    def __init__(self, embed_dim=768, cosine_loss=False, **kwargs):
        kwargs.pop('norm_pix_loss', None)  # the targets are features, not pixels
        super().__init__(embed_dim=embed_dim, pred_dim=embed_dim, **kwargs)
        self.cosine_loss = cosine_loss  # with a CLIP teacher; bootstrapped teachers use SmoothL1

    @classmethod
    def build_teacher(cls, args, state=None):
        """The stage's teacher: `state` when resuming (whatever stage it teaches); else, per --teacher, a random ViT
        of the student's architecture that the student will start from (its first --teacher_depth blocks; 0 blocks
        leaves the normalised random patch embedding plus position code, the paper's large/huge recipe), or a
        pre-trained ViT file, or --teacher clip."""
        size = VIT_SIZES[args.model]
        grid = (args.img_size // args.patch_size,) * 2
        if args.teacher == 'clip' and (state is None or 'sha256' in state):  # not yet replaced by a student
            clip, source = load_clip(args, grid)
            if state is not None and state['sha256'] != source['sha256']:
                raise ValueError(f'--clip_weights {source["weights"]} is not the file this run started with')
            if clip.width != size['embed_dim']:
                raise ValueError(f'--clip_model {args.clip_model} has width {clip.width}; the student '
                                 f'{args.model} has {size["embed_dim"]}')
            return ClipTargets(clip, source)
        if state is None and args.teacher in (None, 'random'):
            depth = size['depth'] if args.teacher_depth is None else args.teacher_depth
            teacher = Teacher(args.img_size, args.patch_size, size['embed_dim'], depth, size['num_heads'])
            teacher.initialize_weights()
        else:
            state = read_encoder_state_dict(args.teacher) if state is None else state
            teacher = build_vit(state, args.img_size, Teacher, size['num_heads'])  # the student's width and heads
        if teacher.grid_size != grid or teacher.cls_token.shape[-1] != size['embed_dim']:
            raise ValueError(f'teacher {args.teacher}: its {teacher.grid_size} token grid of width '
                             f'{teacher.cls_token.shape[-1]} does not match the student\'s {grid} grid of width '
                             f'{size["embed_dim"]}')
        return teacher.requires_grad_(False).eval()

    @classmethod
    def from_args(cls, args, teacher=None):
        student = super().from_args(args, teacher, cosine_loss=isinstance(teacher, ClipTargets))
        if args.teacher in (None, 'random'):  # dBOT §3: the first teacher is the student's own initialisation
            student.load_state_dict(teacher.state_dict(), strict=False)
        return student

    def teacher_state(self, teacher):
        if isinstance(teacher, ClipTargets):
            return teacher.source  # CLIP's weights are a file of their own: keep its hash, not a copy
        return teacher.state_dict()  # bootstrapped teachers exist nowhere else: the checkpoint must hold them

    def next_stage(self, teacher):
        """Bootstrapping at a stage boundary (dBOT §3): the trained student's encoder, hard-copied (no EMA), becomes
        the next teacher, and the whole student (encoder and decoder) starts again from a fresh initialisation.
        The caller makes the new student identical on every rank and gives it a fresh optimizer."""
        student_encoder = {k: v.detach().clone() for k, v in encoder_state_dict(self.state_dict()).items()}
        teacher = build_vit(student_encoder, self.img_size, Teacher, self.num_heads)
        self.initialize_weights()
        self.cosine_loss = False
        return teacher.to(self.cls_token.device).requires_grad_(False).eval()

    def forward_loss(self, pred, targets, mask):
        """SmoothL1 (beta 2) per element, averaged over channels (or, with a CLIP teacher, the negative cosine per
        token), then over the hidden tokens and the cls token.
        pred, targets: (B, 1 + L, D); mask: (B, L), 1 = hidden. The targets are whitened here, outside the
        teacher's inference mode, so that they are ordinary tensors that autograd may save."""
        if self.cosine_loss:  # CLIP teacher: negative cosine, as the official code (on whitened targets: our reading)
            loss = -F.cosine_similarity(pred.float(), whiten(targets), dim=-1)
        else:
            loss = F.smooth_l1_loss(pred.float(), whiten(targets), beta=2.0, reduction='none').mean(dim=-1)
        weight = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return (loss * weight).sum() / weight.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None, targets=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # (B, 1 + L, D): a feature for every token, cls too
        return self.forward_loss(pred, targets, mask), pred[:, 1:], mask

    @torch.no_grad()
    def visualize(self, imgs, pred, mask, targets=None):
        """The hidden tokens' target and predicted features, projected on the targets' first 3 principal
        components and shown as colours; visible tokens are grey."""
        target = whiten(targets[:, 1:])
        flat = target.flatten(0, 1)
        mean = flat.mean(dim=0)
        components = torch.linalg.svd(flat - mean, full_matrices=False).Vh[:3]  # (3, D)
        project = lambda x: (x.float() - mean) @ components.T  # (B, L, 3)
        low, high = project(target).flatten(0, 1).aminmax(dim=0)

        def to_image(x):
            colours = ((project(x) - low) / (high - low + 1e-6)).clamp(0, 1)
            colours = torch.where(mask.unsqueeze(-1).bool(), colours, 0.5)
            colours = colours.transpose(1, 2).reshape(imgs.shape[0], 3, *self.grid_size)
            return F.interpolate(colours, size=imgs.shape[-2:], mode='nearest')

        hidden = F.interpolate(mask.view(-1, 1, *self.grid_size), size=imgs.shape[-2:], mode='nearest')
        rows = [denormalize(imgs), denormalize(imgs) * (1 - hidden) + 0.5 * hidden, to_image(target), to_image(pred)]
        return rows, 'original | masked | target features | predicted features (hidden tokens, 3-component PCA)'
