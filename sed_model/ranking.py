"""Each pixel's best class (and the best class of another group) over classes that arrive in chunks.

Label maps of large taxonomies are made without a `(T, H, W)` tensor: the kept classes'
probabilities are resized a chunk at a time and merged into a running best (`RunningTop`), as
`SED.label_batch` and the tiled path (`tiling.py`) do. Ties go to the lower class index, as
`argmax` does.
"""

from __future__ import annotations

import torch

Pair = tuple[torch.Tensor, torch.Tensor]  # (probability, class index) per pixel


def top_one(probs: torch.Tensor, classes: torch.Tensor) -> Pair:
    value, index = probs.max(dim=0)
    return value, classes[index]


def top_two(probs: torch.Tensor, classes: torch.Tensor, groups: torch.Tensor) -> tuple[Pair, Pair]:
    """Per pixel: (probability, class) of the best, then of the best of another group (-1 and
    class -1 if none); both by `max`, so ties go to the lower index as for the labels alone."""
    value, index = probs.max(dim=0)
    rivals = probs.masked_fill(groups[:, None, None] == groups[index][None], -1.0)
    second_value, second_index = rivals.max(dim=0)
    second_class = torch.where(second_value >= 0, classes[second_index], torch.full_like(second_index, -1))
    return (value, classes[index]), (second_value, second_class)


def merge_best(best: Pair, chunk_best: Pair) -> Pair:
    """The running best after a later chunk of classes; on ties the earlier class wins."""
    better = chunk_best[0] > best[0]
    return torch.where(better, chunk_best[0], best[0]), torch.where(better, chunk_best[1], best[1])


def merge_top_two(best: Pair, second: Pair, chunk_best: Pair, chunk_second: Pair, class_groups: torch.Tensor | None) -> tuple[Pair, Pair]:
    """The running (best, best of another group) after a later chunk of classes.

    Each side's second is already of another group than its best. If both bests are of one group,
    the new second is the higher of the two seconds; otherwise it is the losing best or the
    winner's own second, whichever is higher. On equal probabilities the lower class wins."""
    better = chunk_best[0] > best[0]
    if class_groups is None:
        same = torch.zeros_like(better)
    else:
        groups = class_groups.to(best[1].device)
        same = groups[best[1]] == groups[chunk_best[1]]
    rival = (
        torch.where(same, second[0], torch.where(better, best[0], chunk_best[0])),
        torch.where(same, second[1], torch.where(better, best[1], chunk_best[1])),
    )
    own = (torch.where(same | better, chunk_second[0], second[0]), torch.where(same | better, chunk_second[1], second[1]))
    take_own = (own[0] > rival[0]) | ((own[0] == rival[0]) & (own[1] >= 0) & ((own[1] < rival[1]) | (rival[1] < 0)))
    merged_second = (torch.where(take_own, own[0], rival[0]), torch.where(take_own, own[1], rival[1]))
    return merge_best(best, chunk_best), merged_second


def margin(probs: torch.Tensor, classes: torch.Tensor, class_groups: torch.Tensor | None) -> torch.Tensor:
    """Per pixel of `probs` `(k, H, W)` (classes `classes`), the best class's probability minus
    the best of another group's (0 if none): how close the pixel came to another label."""
    groups = classes if class_groups is None else class_groups.to(classes.device)[classes]
    best, index = probs.max(dim=0)
    rivals = probs.masked_fill(groups[:, None, None] == groups[index][None], -1.0)
    return best - rivals.max(dim=0).values.clamp(min=0)


class RunningTop:
    """The best class per pixel over the chunks given to `add` (in class order), and with
    `runner_up` the best class of another group (`class_groups`: one id per class; None: each
    class its own group)."""

    def __init__(self, runner_up: bool = False, class_groups: torch.Tensor | None = None) -> None:
        self.with_runner_up = runner_up
        self.class_groups = class_groups
        self.best: Pair | None = None
        self.second: Pair | None = None

    def add(self, probs: torch.Tensor, classes: torch.Tensor) -> None:
        """`probs` `(k, H, W)` of the classes `classes` `(k,)`."""
        if not self.with_runner_up:
            chunk_best = top_one(probs, classes)
            self.best = chunk_best if self.best is None else merge_best(self.best, chunk_best)
            return
        groups = classes if self.class_groups is None else self.class_groups.to(classes.device)[classes]
        chunk_best, chunk_second = top_two(probs, classes, groups)
        if self.best is None:
            self.best, self.second = chunk_best, chunk_second
        else:
            self.best, self.second = merge_top_two(self.best, self.second, chunk_best, chunk_second, self.class_groups)

    def runner_up(self) -> torch.Tensor | None:
        """Each pixel's second class (-1 where no other group was kept), if asked for."""
        return self.second[1] if self.with_runner_up else None
