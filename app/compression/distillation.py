"""Knowledge distillation loss (Hinton et al. 2015), a pure function.

loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones when
T changes. Works for classifier logits (B, C) and language-model logits (B, T, V) (per token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    s = student.float().reshape(-1, student.size(-1))
    t = teacher.float().reshape(-1, teacher.size(-1))
    ce = F.cross_entropy(s, targets.reshape(-1))
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                  log_target=True, reduction="batchmean")
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl
