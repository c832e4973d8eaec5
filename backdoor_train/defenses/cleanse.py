"""Trigger reverse-engineering (Neural Cleanse, Wang et al. 2019) and unlearning the trigger it
recovers.

Per class ``c``, gradient descent finds the smallest mask ``m`` (H×W in [0, 1]) and pattern
``p`` (C×H×W in [0, 1]) such that ``(1 - m) * x + m * p`` sends clean images ``x`` to ``c``: the
loss is cross-entropy to ``c`` plus ``λ * |m|_1``, and ``λ`` is raised while the flip succeeds
on at least ``attack_target`` of the batch and lowered while it fails (the paper's schedule).
A backdoor target needs a far smaller mask than the other classes; the anomaly index of class
``c`` is ``(median - |m_c|_1) / (1.4826 * MAD)`` over the classes' mask norms, and a class whose
index exceeds 2 is flagged (the paper's threshold).

``unlearn`` is the paper's mitigation: fine-tune on clean images of which a share carries the
recovered trigger with their true label, so the model learns to ignore it.

``NeuralCleanse`` is the defense (defenses/base.py's ``ModelDefense``): the triggers reversed
from the defender's clean images, the suspect's trigger unlearned, both measured on the
held-out images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoor_train.checks import check
from backdoor_train.data.split import to_float
from backdoor_train.defenses.base import Block, DefenseContext, ModelDefense, Plot, Table, Text, pct, rounded
from backdoor_train.progress import StepClock

ANOMALY_THRESHOLD = 2.0  # Wang et al.: an anomaly index above 2 flags the class (95% under normality)
MAD_CONSISTENCY = 1.4826  # makes the median absolute deviation estimate a normal standard deviation


@dataclass(frozen=True)
class ReversedTrigger:
    target: int
    mask: torch.Tensor  # float [H, W] in [0, 1]
    pattern: torch.Tensor  # float [C, H, W] in [0, 1]
    l1: float  # the mask's L1 norm: how many pixels' worth the trigger needs
    flip_rate: float  # share of held-out clean images (not of class target) it sends to target


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * x + mask * pattern`` on float images [N, C, H, W] in [0, 1]."""
    return (1 - mask) * x + mask * pattern


def reverse_engineer(model: nn.Module, x: torch.Tensor, target: int, steps: int = 300, batch_size: int = 256,
                     lr: float = 0.1, init_cost: float = 1e-3, attack_target: float = 0.99,
                     seed: int = 0) -> ReversedTrigger:
    """The smallest trigger that flips clean images ``x`` (float [N, C, H, W]) to ``target``."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    device = x.device
    _, c, h, w = x.shape
    # Unconstrained parameters squashed into [0, 1] (the paper's tanh parametrisation).
    mask_raw = (torch.rand(1, 1, h, w, generator=gen) * 0.2 - 2.0).to(device).requires_grad_()
    pattern_raw = (torch.rand(1, c, h, w, generator=gen) * 2 - 1).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    cost, up, down, patience = init_cost, 0, 0, 5
    labels = torch.full((batch_size,), target, dtype=torch.long, device=device)
    best = None
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen).to(device)
        mask = (torch.tanh(mask_raw) + 1) / 2
        pattern = (torch.tanh(pattern_raw) + 1) / 2
        logits = model(stamp(x[idx], mask, pattern))
        ce = F.cross_entropy(logits, labels[:len(idx)])
        l1 = mask.sum()
        loss = ce + cost * l1
        opt.zero_grad()
        loss.backward()
        opt.step()
        success = float((logits.argmax(1) == target).float().mean())
        if success >= attack_target and (best is None or float(l1.detach()) < best[0]):
            best = (float(l1.detach()), mask.detach()[0, 0].clone(), pattern.detach()[0].clone())
        # Raise the cost while the flip holds, lower it while it does not.
        up, down = (up + 1, 0) if success >= attack_target else (0, down + 1)
        if up >= patience:
            cost, up = cost * 1.5, 0
        elif down >= patience:
            cost, down = cost / 1.5 ** 1.5, 0
    if best is None:  # never reached the flip rate: keep the last, and say how far it got
        mask = ((torch.tanh(mask_raw) + 1) / 2).detach()[0, 0]
        best = (float(mask.sum()), mask, ((torch.tanh(pattern_raw) + 1) / 2).detach()[0])
    l1, mask, pattern = best
    with torch.no_grad():
        pred = model(stamp(x, mask, pattern)).argmax(1)
    return ReversedTrigger(target, mask.cpu(), pattern.cpu(), l1, float((pred == target).float().mean()))


def anomaly_indices(norms: list[float]) -> list[float]:
    """Per class: how many robust standard deviations its mask norm lies *below* the median
    (0 for those above it: only unusually small triggers betray a backdoor)."""
    values = np.asarray(norms, dtype=np.float64)
    median = float(np.median(values))
    mad = MAD_CONSISTENCY * float(np.median(np.abs(values - median)))
    if mad == 0:
        return [0.0] * len(norms)
    return [max(0.0, (median - v) / mad) for v in values]


def neural_cleanse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                   say: Callable[[str], None] = lambda msg: None, **kwargs: Any) -> dict[str, Any]:
    """Reverse-engineer a trigger for every class from clean images ``x`` (labels ``y``; each
    class's own images are left out of its optimisation) and flag the anomalous classes;
    ``say`` gets a progress line per class (minutes in all on a CPU)."""
    reversed_ = []
    clock = StepClock(num_classes)
    for c in range(num_classes):
        others = x[y != c]
        reversed_.append(reverse_engineer(model, others, c, **kwargs))
        clock.step()
        say(f"neural cleanse: class {c} ({c + 1}/{num_classes}): mask L1 {reversed_[-1].l1:.1f}, flip rate "
            f"{reversed_[-1].flip_rate:.1%}  {clock.summary()}")
    norms = [r.l1 for r in reversed_]
    index = anomaly_indices(norms)
    return {
        "l1_norms": norms,
        "anomaly_index": index,
        "flip_rates": [r.flip_rate for r in reversed_],
        "flagged_classes": [c for c in range(num_classes) if index[c] > ANOMALY_THRESHOLD],
        "suspect": int(np.argmax(index)),
        "triggers": reversed_,
    }


def mask_mass_near(mask: torch.Tensor, row: int, col: int, size: int, radius: int = 1) -> float:
    """Share of the mask's mass within ``radius`` pixels of the ``size``×``size`` square at
    (row, col): whether the recovered trigger sits where the real one is."""
    h, w = mask.shape
    r0, r1 = max(0, row - radius), min(h, row + size + radius)
    c0, c1 = max(0, col - radius), min(w, col + size + radius)
    total = float(mask.sum())
    return float(mask[r0:r1, c0:c1].sum()) / total if total else 0.0


def unlearn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: ReversedTrigger, epochs: int = 1,
            share: float = 0.2, lr: float = 1e-3, batch_size: int = 128, seed: int = 0) -> nn.Module:
    """Fine-tune ``model`` (in place) on clean ``x``/``y`` where a ``share`` of each batch carries
    the recovered trigger but keeps its true label; returns the model."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    mask, pattern = trigger.mask.to(x.device), trigger.pattern.to(x.device)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb = x[idx].clone()
            k = int(round(share * len(idx)))
            xb[:k] = stamp(xb[:k], mask, pattern)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


@dataclass(frozen=True)
class CleanseKnobs:
    cleanse_steps: int = 300  # optimisation steps per class
    unlearn_epochs: int = 1  # unlearning the recovered trigger: epochs over the clean images

    def __post_init__(self) -> None:
        for key in ("cleanse_steps", "unlearn_epochs"):
            check(getattr(self, key) > 0, f"defense.{key} must be > 0 (got {getattr(self, key)})")


class NeuralCleanse(ModelDefense):
    """Neural Cleanse and its mitigation, unlearning, with clean accuracy and ASR before and after."""

    name = "neural_cleanse"
    title = "Neural Cleanse"
    Knobs = CleanseKnobs

    def inspect(self, ctx: DefenseContext) -> dict[str, Any]:
        model = ctx.model.to(ctx.device)
        x, y = to_float(ctx.clean.images).to(ctx.device), ctx.clean.labels.to(ctx.device)
        return neural_cleanse(model, x, y, ctx.cfg.dataset.num_classes, say=ctx.say,
                              steps=ctx.knobs.cleanse_steps, seed=ctx.cfg.seed)

    def evaluate_defence(self, ctx: DefenseContext, found: dict[str, Any]) -> dict[str, Any]:
        from backdoor_train.attack.evaluate import build_eval_sets, full_evaluation

        cfg, model = ctx.cfg, ctx.model.to(ctx.device)
        triggers = found.pop("triggers")
        suspect = triggers[found["suspect"]]
        found["suspect_mask"] = rounded(suspect.mask)
        found["suspect_pattern"] = rounded(suspect.pattern)
        trigger = cfg.poison.trigger
        if trigger.kind in ("pixel", "patch"):  # where the real trigger is: is the recovered one there?
            size = getattr(trigger, "size", 1)
            found["suspect_mass_near_trigger"] = mask_mass_near(suspect.mask, trigger.row, trigger.col, size)
        # Unlearning (the paper's mitigation) of the flagged class's trigger, measured before and after.
        sets = build_eval_sets(ctx.held, cfg.poison).to(ctx.device)
        figures = ("clean_accuracy", "attack_success_rate")

        def measure(m: nn.Module) -> dict[str, float]:
            evaluation = full_evaluation(m, sets, cfg.poison.target, cfg.dataset.num_classes)
            return {k: evaluation[k] for k in figures}

        found["unlearning"] = {"before": measure(model)}
        if found["flagged_classes"]:
            x, y = to_float(ctx.clean.images).to(ctx.device), ctx.clean.labels.to(ctx.device)
            fixed = unlearn(copy.deepcopy(model), x, y, suspect, epochs=ctx.knobs.unlearn_epochs, seed=cfg.seed)
            found["unlearning"].update(unlearned_class=found["suspect"], after=measure(fixed))
        return found

    def log_lines(self, result: dict[str, Any]) -> list[str]:
        lines = [f"neural cleanse: anomaly index {max(result['anomaly_index']):.2f} for class {result['suspect']}, "
                 f"flagged classes {result['flagged_classes'] or 'none'}"]
        unlearning = result["unlearning"]
        if "after" in unlearning:
            before, after = unlearning["before"], unlearning["after"]
            lines.append(f"unlearning class {unlearning['unlearned_class']}'s trigger: ASR "
                         f"{before['attack_success_rate']:.2%} -> {after['attack_success_rate']:.2%}, "
                         f"clean accuracy {before['clean_accuracy']:.2%} -> {after['clean_accuracy']:.2%}")
        return lines

    def report_section(self, result: dict[str, Any], cfg: Any, detection: dict[str, Any]) -> list[Block]:
        """The anomaly index per class, the suspect's recovered mask beside the real trigger, and
        unlearning's effect."""
        import matplotlib.pyplot as plt

        from backdoor_train.attack.triggers import apply_trigger

        real = apply_trigger(torch.zeros((1, *cfg.dataset.shape), dtype=torch.uint8), cfg.poison.trigger)[0]
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), gridspec_kw={"width_ratios": [2.2, 1, 1]})
        index = result["anomaly_index"]
        axes[0].bar(range(len(index)), index, color=["C3" if c in result["flagged_classes"] else "C0"
                                                     for c in range(len(index))])
        axes[0].axhline(ANOMALY_THRESHOLD, color="k", ls="--", lw=1)
        axes[0].set_xticks(range(len(index)))
        axes[0].set_title(f"anomaly index per class (flagged > {ANOMALY_THRESHOLD:g})")
        axes[1].imshow(torch.tensor(result["suspect_mask"]).numpy(), cmap="magma", vmin=0, vmax=1)
        axes[1].set_title(f"recovered mask, class {result['suspect']}")
        axes[2].imshow(real.permute(1, 2, 0).float().div(255).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2].set_title(f"real trigger (target {cfg.poison.target})")
        for ax in axes[1:]:
            ax.set_xticks([])
            ax.set_yticks([])
        near = result.get("suspect_mass_near_trigger")
        blocks: list[Block] = [
            Text(f"Suspect class {result['suspect']} (anomaly index {max(index):.2f}; flagged: "
                 f"{result['flagged_classes'] or 'none'}); its mask's L1 norm "
                 f"{result['l1_norms'][result['suspect']]:.1f} against a median of "
                 f"{sorted(result['l1_norms'])[len(index) // 2]:.1f}"
                 + (f"; {near:.0%} of its mass within one pixel of the real trigger" if near is not None else "")
                 + f". Reverse-engineered from the first {detection.get('defender_clean_samples')} test images."),
            Plot(fig)]
        unlearning = result["unlearning"]
        if "after" in unlearning:
            before, after = unlearning["before"], unlearning["after"]
            blocks.append(Table(["model", "clean accuracy", "ASR"],
                                [["poisoned", pct(before["clean_accuracy"]), pct(before["attack_success_rate"])],
                                 [f"class {unlearning['unlearned_class']}'s trigger unlearned",
                                  pct(after["clean_accuracy"]), pct(after["attack_success_rate"])]]))
        else:
            blocks.append(Text("No class flagged: nothing to unlearn."))
        return blocks
