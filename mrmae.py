"""
MR-MAE: mimic before reconstruct, and MR-MCMAE.

"Mimic before Reconstruct: Enhancing Masked Autoencoders with Feature Mimicking", 2023. https://arxiv.org/abs/2303.05475
Only what the paper adds to MAE (mae.py): the encoder's visible tokens mimic frozen teachers' features at the same
positions (CLIP and DINO), through one linear head per teacher, while the decoder reconstructs the pixels of the
hidden tokens exactly as in MAE. The two targets touch disjoint tokens, so they do not pull against each other.
The paper applies the same to MCMAE's hybrid encoder (mcmae.py): MR-MCMAE, at the end of this file.

Outside train.py (with mae.py, mcmae.py and teachers.py; open_clip for a CLIP teacher):

    teachers = load_teachers('clip+dino', grid=(14, 14), clip_weights='ViT-B-16.pt', dino_weights='dino_b16.pth')
    model = MRMAE(teachers.dims, img_size=224, patch_size=16, **VIT_SIZES['vit_base'])
    ...  loss, _, _ = model(imgs, targets=teachers(imgs))  # each step, the teachers under torch.no_grad()
"""

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mae import MAE, gather_tokens, whiten
from mcmae import MCMAE
from teachers import load_clip, load_dino, load_own

LOADER_FLAGS = ('clip_model', 'clip_weights', 'clip_quick_gelu', 'dino_model', 'dino_weights')


class MimicTeachers(nn.Module):
    """The frozen teachers of a run: images -> {'features': {name: (B, L, D_t)}, 'attention': (B, L) or None}."""

    def __init__(self, teachers, sources, focus=None):
        super().__init__()
        self.teachers = nn.ModuleDict(teachers)
        self.sources, self.focus = sources, focus  # sources: where each teacher's weights came from, with hashes
        self.dims = {name: teacher.width for name, teacher in teachers.items()}

    def forward(self, imgs):
        features, attention = {}, None
        for name, teacher in self.teachers.items():
            features[name], weights = teacher(imgs, attention=name == self.focus)
            attention = weights if weights is not None else attention
        return dict(features=features, attention=attention)


def load_teachers(teacher='clip+dino', grid=(14, 14), focused_mimic=False, state=None, **loaders):
    """teacher: clip, dino, or files of ViTs trained here, joined by '+'; grid: the student's token grid; loaders:
    load_clip's and load_dino's keywords (which model, which local weights file). Resuming (state), the files must be
    the ones the run started with: the same targets, or the run would silently change what it learns."""
    teachers, sources = {}, {}
    for spec in teacher.split('+'):
        if spec == 'clip':
            name, (module, source) = 'clip', load_clip(grid, **{k: v for k, v in loaders.items() if 'clip' in k})
        elif spec == 'dino':
            name, (module, source) = 'dino', load_dino(grid, **{k: v for k, v in loaders.items() if 'dino' in k})
        else:
            name, (module, source) = re.sub(r'\W', '_', Path(spec).stem), load_own(spec, grid)
        name = name if name not in teachers else f'{name}_{len(teachers)}'
        teachers[name], sources[name] = module, source
        if state is not None and state.get(name, {}).get('sha256') != source['sha256']:
            raise ValueError(f'teacher {name}: {source["weights"]} is not the file this run started with '
                             f'({state.get(name)})')
    # Focused mimicking follows DINO's attention when DINO teaches (its [CLS] attention is the one known to single
    # out objects), else the first teacher's that has a [CLS] token (MCMAE encoders have none).
    focus = None
    if focused_mimic:
        with_cls = [name for name, module in teachers.items() if module.num_prefix_tokens]
        if not with_cls:
            raise ValueError(f'--focused_mimic follows a teacher\'s [CLS] attention, and none of --teacher '
                             f'{teacher} has a [CLS] token (MCMAE encoders have none): add a ViT teacher')
        focus = 'dino' if 'dino' in with_cls else with_cls[0]
    return MimicTeachers(teachers, sources, focus)


class Mimic:
    """What MR-MAE adds to a masked autoencoder (MAE: MRMAE; MCMAE's hybrid encoder: MRMCMAE): frozen teachers, one
    linear head per teacher on the encoder's visible tokens, and the mimic loss beside the pixel reconstruction. The
    model's forward_encoder returns (latent, mimic_input, mask, ids_restore)."""

    flags = ('teacher', 'clip_model', 'clip_weights', 'clip_quick_gelu', 'dino_model', 'dino_weights', 'mimic_weight',
             'focused_mimic', 'fusion_layers')

    def add_mimic_heads(self, teacher_dims, mimic_weight, focused_mimic):
        width = self.norm.normalized_shape[0]
        self.mimic_weight, self.focused_mimic = mimic_weight, focused_mimic
        self.mimic_heads = nn.ModuleDict({name: nn.Linear(width, dim) for name, dim in teacher_dims.items()})

    @classmethod
    def build_teacher(cls, args, state=None):  # train.py's adapter
        grid = (args.img_size // args.patch_size,) * 2
        return load_teachers(args.teacher or 'clip+dino', grid, args.focused_mimic, state,
                             **{flag: getattr(args, flag) for flag in LOADER_FLAGS})

    @classmethod
    def from_args(cls, args, teacher=None):
        fusion = dict(fusion_layers=args.fusion_layers) if 'fusion_layers' in cls.flags else {}
        return super().from_args(args, teacher, teacher_dims=teacher.dims, mimic_weight=args.mimic_weight,
                                 focused_mimic=args.focused_mimic, **fusion)

    def teacher_state(self, teacher):
        return teacher.sources  # names and file hashes: the teachers' weights never enter our checkpoints

    def mimic_loss(self, visible_tokens, features, ids_keep):
        """Per teacher: MSE between its head's prediction from the visible tokens (B, K, D) and its whitened
        features at the same positions (MSE and the whitening are our reading; the paper leaves them open)."""
        return {name: F.mse_loss(head(visible_tokens).float(),
                                 gather_tokens(whiten(features[name], unbiased=False), ids_keep))
                for name, head in self.mimic_heads.items()}

    def forward(self, imgs, mask_ratio=0.75, noise=None, targets=None):
        if self.focused_mimic and noise is None:
            # Focused mimicking (our reading; unverified): keep K tokens sampled without replacement in proportion
            # to the teacher's [CLS] attention. An exponential race does it: token i draws E_i / a_i with
            # E_i ~ Exp(1), and the K smallest draws, which the masking keeps, are such a sample.
            attention = targets['attention'].float()
            noise = torch.empty_like(attention).exponential_() / attention.clamp_min(1e-12)
        latent, mimic_input, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        n = self.num_prefix_tokens
        pred = self.forward_decoder(latent, ids_restore)[:, n:]
        loss_rec = self.forward_loss(imgs, pred, mask)  # hidden tokens only
        ids_keep = ids_restore.argsort(dim=1)[:, :latent.shape[1] - n]  # visible tokens, in the encoder's order
        mimic = self.mimic_loss(mimic_input[:, n:], targets['features'], ids_keep)  # visible tokens only
        loss = loss_rec + self.mimic_weight * sum(mimic.values())
        self.loss_terms = dict(loss_rec=loss_rec.detach(), **{f'loss_mimic_{k}': v.detach() for k, v in mimic.items()})
        return loss, pred, mask


class MRMAE(Mimic, MAE):
    def __init__(self, teacher_dims, mimic_weight=1.0, fusion_layers=0, focused_mimic=False, **kwargs):
        super().__init__(**kwargs)
        self.add_mimic_heads(teacher_dims, mimic_weight, focused_mimic)
        # Multi-layer fusion (our reading; the paper's details are unverified): the heads see a learned softmax mix of
        # the last K blocks' outputs instead of the last block's alone.
        self.fusion_logits = nn.Parameter(torch.zeros(fusion_layers)) if fusion_layers else None
        self.initialize_weights()  # again: the heads did not exist when MAE's __init__ ran it

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """MAE's encoder, also returning what the mimic heads see: (latent, mimic_input, mask, ids_restore), both
        (B, 1 + K, D) after the final norm."""
        x, mask, ids_restore = self.embed_visible(imgs, mask_ratio, noise)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        latent = self.norm(x)
        if self.fusion_logits is None:
            return latent, latent, mask, ids_restore
        mixed = sum(w * h for w, h in zip(self.fusion_logits.softmax(dim=0), outputs[-len(self.fusion_logits):]))
        return latent, self.norm(mixed), mask, ids_restore


class MRMCMAE(Mimic, MCMAE):  # MCMAE whose visible stage-3 tokens mimic the teachers
    flags = tuple(flag for flag in Mimic.flags if flag != 'fusion_layers')  # it mimics the fused stage-3 tokens

    def __init__(self, teacher_dims, mimic_weight=1.0, focused_mimic=False, **kwargs):
        super().__init__(**kwargs)
        self.add_mimic_heads(teacher_dims, mimic_weight, focused_mimic)
        self.initialize_weights()  # again, for the heads

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        latent, mask, ids_restore = super().forward_encoder(imgs, mask_ratio, noise)
        return latent, latent, mask, ids_restore  # the heads see the visible stage-3 tokens
