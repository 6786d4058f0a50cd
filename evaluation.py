"""Evaluation of a language model on a held-out split: the loss (as the author's code: the mean
of per-batch means), the loss at each block position, and on associative recall (MQAR) the
accuracy at the queries, within and beyond the model's receptive field. Under torchrun each
process scores its share of the batches and the sums are gathered."""

from __future__ import annotations

import math

import torch

import distributed
from common import autocast_context


@torch.no_grad()
def evaluate(model, loader, device, receptive_field: int | None = None, dtype: str = "fp32") -> dict:
    """Validation statistics of one epoch:

    - ``val_loss``: the mean of per-batch mean losses, as the author's code;
    - ``val_loss_by_position``: the mean loss at each block position (position p has p + 1
      tokens of context), which shows how much a model gains from context; NaN where no
      target is scored (targets -100);
    - on an associative-recall set (a dataset with ``distances``): the recall accuracy at the
      queries, overall and split at ``receptive_field`` (synthetic.recall_accuracy).
    """
    from synthetic import recall_accuracy

    model.eval()
    T = loader.dataset[0][1].shape[-1]
    losses, predictions = [], []
    pos_sum = torch.zeros(T, dtype=torch.float64, device=device)                # (T,)
    pos_count = torch.zeros(T, dtype=torch.long, device=device)                 # (T,)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast_context(dtype, device):
            logits, loss = model(x, y)
        logits = logits.float()
        losses.append(loss.item())
        per_token = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), y, reduction="none", ignore_index=-100)     # (B, T), 0 where ignored
        pos_sum = pos_sum + per_token.double().sum(0)                       # (T,)
        pos_count = pos_count + (y != -100).sum(0)                          # (T,)
        predictions.append(logits.argmax(-1).cpu())                         # (B, T)
    # Under torchrun each process evaluated its share of the batches (data.ShardedBatches): sum them.
    loss_sum, n_batches, pos_sum, pos_count = distributed.all_sum([sum(losses), len(losses), pos_sum, pos_count])
    by_position = torch.where(pos_count > 0, pos_sum / pos_count.clamp(min=1), math.nan)
    stats = {"val_loss": loss_sum / n_batches, "val_loss_by_position": by_position.tolist()}
    dataset = loader.dataset
    if hasattr(dataset, "distances"):  # unshuffled batches, gathered back: predictions in dataset order
        predictions = distributed.gather_batches(predictions)
        stats.update(recall_accuracy(torch.cat(predictions), dataset.targets, dataset.distances, receptive_field))
    return stats


def evaluate_test(model, loader, device, dtype: str, record: dict) -> None:
    """The final model on the test split, scored as validation is. The learning rate may be
    chosen on validation, which then no longer estimates unseen data: test still does."""
    test_loss = evaluate(model, loader, device, dtype=dtype)["val_loss"]
    record.update(final_test_loss=test_loss, final_test_ppl=math.exp(min(test_loss, 700.0)))
    print(f"  test {test_loss:.4f} | ppl {record['final_test_ppl']:.2f}")
