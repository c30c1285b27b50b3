"""Every trainable model takes real optimiser steps on a CUDA GPU, in fp32 and in bf16 autocast + channels_last.

CPU CI skips these. On a GPU machine: ``pytest tests/models/test_cuda.py``. They exist because a CUDA kernel can
fail where its CPU twin works: UnCRtainTS's temporal attention passed CPU training and broke in the CUDA backward
of ``scaled_dot_product_attention`` on an expanded (stride 0) query.
"""

from __future__ import annotations

import pytest
import torch

from models.registry import build_model
from pipeline.train.config import TrainConfig
from pipeline.train.loop import LoopState, build_parts, train_step
from pipeline.train.runtime import setup_runtime
from tests.models.helpers import TRAINABLE, make_batch, vgg_file_fixture  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

@pytest.mark.parametrize("precision,channels_last", [("fp32", False), ("bf16", True)])
@pytest.mark.parametrize("name", TRAINABLE)
def test_training_steps_on_cuda_change_every_trained_weight_and_stay_finite(name, precision, channels_last, vgg_file):
    # the paper-style losses (VGG perceptual term, GAN) where a model has them, so their kernels run too
    params = {"base": "small", "loss": {"perceptual": 1.0}} if name == "crgennet" else "small"
    cfg = TrainConfig(model=name, model_params=params, batch_size=2, num_workers=0, precision=precision,
                      channels_last=channels_last, deterministic=False, vgg_weights=vgg_file)
    rt = setup_runtime(cfg)
    assert rt.device.type == "cuda" and rt.channels_last == channels_last
    parts = build_parts(cfg, rt, 1)
    parts.model.train()
    before = {n: p.detach().clone() for n, p in parts.model.named_parameters()}
    batch = make_batch(build_model(name, params).spec, 2, 64)
    st = LoopState()
    for _ in range(2):
        logs = train_step(parts, batch, cfg, rt, st)
        st.step += 1
        assert all(torch.isfinite(torch.as_tensor(v)) for v in logs.values()), logs
    moved = [n for n, p in parts.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before), f"{name}: unchanged after two steps: {sorted(set(before) - set(moved))[:5]}"
