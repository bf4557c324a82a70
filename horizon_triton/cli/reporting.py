"""Reports of a run beside metrics.jsonl: a plot of loss, eval loss and learning rate (PNG, matplotlib), and
TensorBoard scalars. Both are optional extras: ``pip install "horizon-triton[plot]"`` / ``"[tensorboard]"``."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines with an eval_loss) of a metrics.jsonl."""
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return ([m for m in lines if m.get("kind") == "train"],
            [m for m in lines if m.get("kind") == "eval" and "eval_loss" in m])


def plot_metrics(metrics_path: Path, png_path: Path) -> Path:
    """Training loss and eval loss against the step (left axis), the learning rate (right axis)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError('the loss plot needs matplotlib: pip install "horizon-triton[plot]"') from None
    matplotlib.use("Agg")                    # files only, never a window
    import matplotlib.pyplot as plt
    train, evals = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot([m["step"] for m in train], [m["loss"] for m in train], label="train loss", color="tab:blue")
    if evals:
        ax.plot([m["step"] for m in evals], [m["eval_loss"] for m in evals], "o-", label="eval loss",
                color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over trained tokens)")
    lr_ax = ax.twinx()
    lr_ax.plot([m["step"] for m in train], [m["lr"] for m in train], "--", label="learning rate", color="tab:gray")
    lr_ax.set_ylabel("learning rate")
    handles = ax.get_legend_handles_labels()[0] + lr_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


class TensorBoard:
    """train/loss, train/lr, train/grad_norm, train/tokens_per_s and eval/loss scalars in ``log_dir``."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError('--report-to tensorboard needs the tensorboard package: '
                             'pip install "horizon-triton[tensorboard]"') from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def train(self, entry: dict) -> None:
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            self.writer.add_scalar(f"train/{key}", entry[key], entry["step"])

    def eval(self, step: int, loss: float) -> None:
        self.writer.add_scalar("eval/loss", loss, step)

    def close(self) -> None:
        self.writer.close()
