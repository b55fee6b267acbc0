"""Feature caching over micro-batches (`loss.negatives: global`): with gradient accumulation, the
contrastive loss of an optimizer step sees the whole global batch as negatives, not one micro-batch
of every worker, at the memory of one micro-batch's graph.

One step, on every rank:
1. embed each micro-batch without building a graph, keeping the random state it started from;
2. gather the step's embeddings from every rank and run the fused loss once over all of them,
   keeping the gradient of the loss for each local embedding and for the logit scale;
3. for each micro-batch, restore its random state, run its forward again with a graph (the same
   token sub-sampling and dropout as in 1) and backpropagate the cached embedding gradients
   through it (the surrogate sum(embedding * gradient)).

The parameter gradients are those of the loss over the global batch at once (GradCache, Gao et al.
2021; OpenCLIP's --accum-freq), for one extra forward per micro-batch. Engine-agnostic: the caller
passes the forward and the backward (DeepSpeed's, without its 1/accumulation scaling).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Forward = Callable[[object], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class RandomState:
    """The torch generators a forward draws from on `device`: the CPU's, and the device's own."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(device) if self.cuda else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state(self.gpu, self.device)


def cached_step(
    forward: Forward,
    backward: Callable[[torch.Tensor], None],
    batches: Sequence,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step's gradients over `batches` (this rank's micro-batches), the loss over the
    step's global batch. forward(batch) -> (image, text embeddings [n, E], scale [1]); backward(t)
    backpropagates a scalar and accumulates into the parameters' gradients, once per micro-batch
    (unscaled: the sum of the micro-batches' surrogates is the loss); loss_fn: the gathered
    contrastive loss (`ContrastiveLoss`). -> (this rank's loss, the scale), both detached."""
    states, images, texts = [], [], []
    with torch.no_grad():
        for batch in batches:
            states.append(RandomState(device))
            image, text, scale = forward(batch)
            images.append(image)
            texts.append(text)
    after = RandomState(device)
    image = torch.cat(images).detach().requires_grad_()
    text = torch.cat(texts).detach().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = loss_fn(image, text, scale)  # the all-gather's backward is a collective: every rank runs it
    image_grad, text_grad, scale_grad = torch.autograd.grad(loss, (image, text, scale))
    start = 0
    for k, batch in enumerate(batches):
        states[k].restore()  # the same sub-sampled tokens and dropout masks as the cached forward
        image, text, scale_k = forward(batch)
        rows = slice(start, start + image.shape[0])
        start = rows.stop
        surrogate = (image * image_grad[rows].to(image.dtype)).sum() + (text * text_grad[rows].to(text.dtype)).sum()
        if k == 0:  # the scale is one parameter of the whole step: its gradient enters once
            surrogate = surrogate + (scale_k * scale_grad.to(scale_k.dtype)).sum()
        backward(surrogate)
    after.restore()  # as if the step had drawn once per micro-batch
    return loss.detach(), scale.detach()
