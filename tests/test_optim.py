"""The optimizer's parameter groups: their order keeps DeepSpeed's flat bf16 buffers aligned, and a
resumed run keeps the order its checkpoint's optimizer state was saved in."""

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
    names = {id(p): name for name, p in model.named_parameters()}
    offset, misaligned = 0, []
    for p in (p for g in groups for p in g["params"]):
        if p.numel() % 8 == 0 and (offset * 2) % 16:  # bf16: 2 bytes per element
            misaligned.append(names[id(p)])
        offset += p.numel()
    assert misaligned == []


def test_a_resumed_run_builds_its_optimizer_in_the_order_its_checkpoint_was_saved_in():
    model, source = _model(), "s3://b/run/step_10"
    assert optim.layout(model, order=list) != optim.layout(model)  # logit_scale moved: the orders differ
    assert optim.resume_order(model, {"param_layout": optim.layout(model)}, source) is optim.aligned_order
    assert optim.resume_order(model, {"param_layout": optim.layout(model, list)}, source) is list
    # saved before the order was recorded: the model's own order, as clippy-ray then built it
    assert optim.resume_order(model, {"step": 10}, source) is list


@pytest.mark.parametrize("saved", [{"param_layout": "0123456789abcdef"}, None])
def test_optimizer_state_of_other_parameters_or_an_unreadable_record_is_refused_with_the_fix(saved):
    with pytest.raises(UserError) as err:
        optim.resume_order(_model(), saved, "s3://b/run/step_10")
    message = str(err.value)
    assert message.startswith("s3://b/run/step_10: ") and "\n" not in message
    assert ("--from-mode weights" in message) if saved else ("train_state.json" in message)
