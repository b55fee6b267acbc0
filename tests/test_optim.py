"""The optimizer's parameter groups: their order keeps DeepSpeed's flat bf16 buffers aligned, and a
checkpoint saved under another order is refused, not loaded into the wrong parameters."""

from __future__ import annotations

import pytest
import torch

from clippy_ray import config
from clippy_ray.errors import UserError
from clippy_ray.model import build_model
from clippy_ray.tokenizer import build_tokenizer
from clippy_ray.train import optim
from tests.conftest import TINY


def _model():
    cfg = config.load(None, TINY)
    torch.manual_seed(0)
    return build_model(cfg.model, build_tokenizer(cfg.model.text).vocab_size)


def test_parameters_of_odd_size_come_last_in_their_group_and_none_is_lost():
    model = _model()
    groups = optim.param_groups(model, 0.1)
    for group in groups:
        odd = [p.numel() % 8 != 0 for p in group["params"]]
        assert odd == sorted(odd)  # every size-multiple-of-8 parameter before the first odd one
    assert groups[1]["params"][-1] is model.logit_scale  # [1]: first among the undecayed before
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}
    # packed back to back as DeepSpeed's ZeRO-1/2 flat buffer is, each starts on a 16-byte boundary
    offset, misaligned = 0, []
    for name, p in ((n, p) for g in groups for p in g["params"] for n, q in model.named_parameters() if q is p):
        if p.numel() % 8 == 0 and (offset * 2) % 16:  # bf16: 2 bytes per element
            misaligned.append(name)
        offset += p.numel()
    assert misaligned == []


def test_a_checkpoint_saved_under_another_parameter_order_is_refused_with_the_fix():
    model = _model()
    optim.check_layout(model, {"param_layout": optim.layout(model)}, "s3://b/run/step_10")  # this version's
    # a checkpoint that records no layout was saved when logit_scale came first among the undecayed
    assert optim.layout(model, order=list) != optim.layout(model)
    for saved in ({}, {"param_layout": "0123456789abcdef"}):
        with pytest.raises(UserError) as err:
            optim.check_layout(model, saved, "s3://b/run/step_10")
        assert "s3://b/run/step_10" in str(err.value) and "--from-mode weights" in str(err.value)
