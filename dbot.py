"""
dBOT: masked knowledge distillation with bootstrapped teachers.

Liu et al., "Exploring Target Representations for Masked Autoencoders", 2022. https://arxiv.org/abs/2209.03917
Only what the paper adds to MAE (mae.py): the decoder predicts a teacher's features instead of pixels, for every
token; the targets are a frozen teacher's whitened last-block tokens of the full image; the loss is SmoothL1 on the
hidden tokens and the cls token; and training runs in stages: at each boundary the student becomes the teacher and
starts again from a fresh initialisation. The first teacher is the student's own random initialisation.

Outside train.py (this file and mae.py are all it needs):

    teacher = Teacher.random(img_size=224, patch_size=16, **VIT_SIZES['vit_base'])  # stage 1's teacher
    model = DBOT(img_size=224, patch_size=16, **VIT_SIZES['vit_base'], pred_dim=teacher.width)
    model.load_state_dict(teacher.state_dict(), strict=False)  # dBOT §3: the student starts as its random teacher
    ...  loss, _, _ = model(imgs, targets=teacher(imgs))  # each step, the teacher under torch.no_grad()
    teacher = model.next_stage(teacher)  # at each stage boundary; then a fresh optimizer for the fresh student

A teacher of another width (dBOT's ViT-L teacher of a ViT-B student) is any Teacher of that width holding its weights:
pred_dim=teacher.width sizes the prediction head to its features; the next stage's teacher is the student itself.

With a CLIP teacher (--teacher clip, the paper's 85.7 row) the official code (its beit branch) differs on almost
every axis, and its student is BEiT-style (mask tokens inside the encoder, relative position bias, layer scale, no
decoder). Ours stays MAE-style: from that recipe it takes the targets (CLIP's patch tokens after ln_post and the
visual projection, cls excluded), the loss (1 - mean cosine over the hidden tokens) and, in docs/methods.md's
command, the optimiser settings. It is therefore not the 85.7 configuration.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae import VIT_SIZES, MAE, ViT, denormalize, encoder_state_dict, whiten


class Teacher(ViT):
    """A frozen ViT. Its output, the target, is the last block's output before the final norm (dBOT §3): the
    whitening in DBOT.forward_loss replaces that norm."""

    @classmethod
    def random(cls, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0):
        """A randomly initialised teacher (stage 1; depth=0 keeps only the normalised random patch embedding plus
        position code, the paper's large/huge recipe)."""
        teacher = cls(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio)
        teacher.initialize_weights()
        return teacher.requires_grad_(False).eval()

    @property
    def width(self):  # of its features: the student's prediction head outputs this many channels
        return self.cls_token.shape[-1]

    def forward(self, imgs):
        return self.forward_blocks(imgs)  # (B, 1 + L, D), cls included


class ClipTargets(nn.Module):
    """A CLIP image tower as the first teacher (dBOT §4.3), loaded as for MR-MAE on the student's grid. As in the
    official code the targets are its patch tokens after the final LayerNorm (ln_post) and the visual projection
    into the joint image-text space (512-d for ViT-B/16), cls excluded; it trains in a single stage (--stages 1:
    bootstrapping would discard what CLIP learned from its extra data)."""

    def __init__(self, clip, source):
        super().__init__()
        self.clip, self.source = clip, source  # source: the weights file and its SHA-256, kept in checkpoints
        self.width = clip.backbone.proj.shape[1]

    def forward(self, imgs):
        tokens = self.clip.last_two_blocks(self.clip.prepare(imgs))[1][:, 1:]
        return self.clip.backbone.ln_post(tokens) @ self.clip.backbone.proj  # (B, L, CLIP's output width)


class DBOT(MAE):
    default_stages = 2  # 2 for classification in the paper; 3 for detection and segmentation
    flags = ('teacher', 'teacher_depth', 'stages', 'stage_epochs', 'clip_model', 'clip_weights', 'clip_quick_gelu')

    def __init__(self, embed_dim=768, cosine_loss=False, pred_dim=None, **kwargs):
        kwargs.pop('norm_pix_loss', None)  # the targets are features, not pixels
        super().__init__(embed_dim=embed_dim, pred_dim=pred_dim or embed_dim, **kwargs)
        self.cosine_loss = cosine_loss  # with a CLIP teacher; bootstrapped teachers use SmoothL1

    @classmethod
    def build_teacher(cls, args, state=None):
        """train.py's adapter. The stage's teacher: `state` when resuming (whatever stage it teaches); else, per
        --teacher, a random ViT of the student's architecture that the student will start from (its first
        --teacher_depth blocks), or a pre-trained ViT file of any width whose grid is the student's, or CLIP."""
        size = VIT_SIZES[args.model]
        grid = (args.img_size // args.patch_size,) * 2
        if args.teacher == 'clip' and (state is None or 'sha256' in state):  # not yet replaced by a student
            if args.stages != 1:
                raise ValueError('--teacher clip trains a single stage, as the official code (a student of CLIP\'s '
                                 'would discard what CLIP learned from its extra data): add --stages 1')
            from teachers import load_clip  # only this teacher needs open_clip
            clip, source = load_clip(grid, args.clip_model, args.clip_weights, args.clip_quick_gelu)
            if state is not None and state['sha256'] != source['sha256']:
                raise ValueError(f'--clip_weights {source["weights"]} is not the file this run started with')
            return ClipTargets(clip, source).requires_grad_(False).eval()
        if state is None and args.teacher in (None, 'random'):
            depth = size['depth'] if args.teacher_depth is None else args.teacher_depth
            return Teacher.random(args.img_size, args.patch_size, size['embed_dim'], depth, size['num_heads'])
        from teachers import build_vit, read_encoder_state_dict  # weight files of every layout we read
        state = read_encoder_state_dict(args.teacher) if state is None else state
        width = state['patch_embed.proj.weight'].shape[0]
        teacher = build_vit(state, args.img_size, Teacher, size['num_heads'] if width == size['embed_dim'] else None)
        if teacher.grid_size != grid:
            raise ValueError(f'teacher {args.teacher}: its patch {teacher.patch_size} gives a {teacher.grid_size} '
                             f'token grid at {args.img_size} px, not the student\'s {grid}: a teacher\'s tokens must '
                             f'be the student\'s (the same patch size)')
        return teacher.requires_grad_(False).eval()

    @classmethod
    def from_args(cls, args, teacher=None):
        clip = isinstance(teacher, ClipTargets)  # the decoder predicts CLIP's projected tokens
        student = super().from_args(args, teacher, cosine_loss=clip, pred_dim=teacher.width)
        if args.teacher in (None, 'random'):  # dBOT §3: the first teacher is the student's own initialisation
            student.load_state_dict(teacher.state_dict(), strict=False)
        return student

    def teacher_state(self, teacher):
        if isinstance(teacher, ClipTargets):
            return teacher.source  # CLIP's weights are a file of their own: keep its hash, not a copy
        return teacher.state_dict()  # bootstrapped teachers exist nowhere else: the checkpoint must hold them

    def next_stage(self, teacher):
        """Bootstrapping at a stage boundary (dBOT §3): the trained student's encoder, hard-copied (no EMA), becomes
        the next teacher, and the whole student (encoder and decoder) starts again from a fresh initialisation, its
        prediction head at the new teacher's width (a wider first teacher's head is replaced). The caller makes the
        new student identical on every rank and gives it a fresh optimizer."""
        width = self.cls_token.shape[-1]
        teacher = Teacher(self.img_size, self.patch_size, width, len(self.blocks), self.num_heads,
                          self.blocks[0].mlp.fc1.out_features / width)
        teacher.load_state_dict(encoder_state_dict(self.state_dict()))  # a copy: the student's tensors stay its own
        if self.decoder_pred.out_features != width:
            self.decoder_pred = nn.Linear(self.decoder_pred.in_features, width).to(self.cls_token.device)
        self.initialize_weights()
        self.cosine_loss = False
        return teacher.to(self.cls_token.device).requires_grad_(False).eval()

    def forward_loss(self, pred, targets, mask):
        """SmoothL1 (beta 2) on whitened targets per element, averaged over channels, then over the hidden tokens and
        the cls token. pred, targets: (B, 1 + L, D); mask: (B, L), 1 = hidden.
        With a CLIP teacher (targets (B, L, D'), no cls): 1 - cosine similarity per hidden token, averaged over them,
        on the raw projected targets, as the official code."""
        if self.cosine_loss:
            loss = 1 - F.cosine_similarity(pred[:, 1:].float(), targets.float(), dim=-1, eps=1e-6)
            return (loss * mask).sum() / mask.sum()
        # the official code whitens by the unbiased variance (divided by D - 1) plus 1e-6, not a LayerNorm's
        loss = F.smooth_l1_loss(pred.float(), whiten(targets, unbiased=True), beta=2.0, reduction='none').mean(dim=-1)
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
        target = whiten(targets if self.cosine_loss else targets[:, 1:], unbiased=True)  # CLIP's targets have no cls
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
