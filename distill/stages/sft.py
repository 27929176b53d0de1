"""Supervised fine-tuning: `ce_weight` (default 1) times the cross-entropy on the data's assistant tokens,
plus `kl_weight` times the divergence to the teacher's next-token distribution (MambaInLlama's first stage
trains on the teacher's own answers with CE + 0.1 KL; `data.answers: teacher` gives those answers). Both terms
are summed per loss token. The objective and loop are `distill.kl`'s, which skip the teacher at `kl_weight` 0.
"""

from __future__ import annotations

from pathlib import Path

from distill.kl import train_kl


def train(ctx, cfg, student, stage_dir: Path):
    return train_kl(ctx, cfg, student, stage_dir)
