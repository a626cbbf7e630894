"""Where an undefended training epoch spends its time, next to what an EPIC round costs.

One epoch of the trainer's work is taken apart and timed piece by piece on the same data and
model: drawing the batches (indexing, uint8 to float, moving them), augmenting them, the
forward and backward pass, the optimizer step, evaluating on the test set, and writing a
checkpoint; then an EPIC round's two parts, the embedding pass over all examples and the
selection.

    python benchmarks/epoch_profile.py --json                    # CIFAR-10 subset if found
    python benchmarks/epoch_profile.py --model resnet18-small --json
    python benchmarks/epoch_profile.py --channels-last --json    # the trainer's option
    python benchmarks/epoch_profile.py --embedding-variants --json  # other ways to embed

With ``--json`` the last line is a JSON object with the settings, ``seconds`` per part and
``share`` of the epoch (the parts the trainer runs every epoch), and the round's parts as a
share of that epoch.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from epic.data import (
    augment_batch,
    channels_last_on_cpu,
    inference_batch_size,
    iterate_batches,
    load_dataset,
)
from epic.gradients import gradient_embeddings
from epic.models import build_model
from epic.selection import find_isolated
from epic.training import evaluate


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def embedding_variants(model: torch.nn.Module, data: Any, fraction: float,
                       sync: Callable[[], None]) -> dict[str, Any]:
    """The round's embedding pass done other ways, each against the default (eval mode,
    ``no_grad``, float32, batches of :func:`epic.data.inference_batch_size`, channels-last
    input on the CPU): seconds (best of 2), the largest difference of an
    embedding, and the share of the default's dropped examples it drops too."""
    def run(**kw: Any) -> tuple[float, Tensor]:
        def once() -> Tensor:
            grads = gradient_embeddings(model, data, **kw)[0]
            sync()
            return grads
        once()  # warm-up
        return min((_timed(once) for _ in range(2)), key=lambda r: r[0])

    def drops(grads: Tensor) -> Tensor:
        return find_isolated(grads, data.labels.to(grads.device), fraction).cpu()

    base_s, base = run()
    base_drop = drops(base)
    out: dict[str, Any] = {"default_s": round(base_s, 3), "default_dropped": int(base_drop.sum())}
    variants: dict[str, dict[str, Any]] = {
        **{f"batch_{b}": {"batch_size": b} for b in (64, 128, 256, 512, 1024)
           if b != inference_batch_size(next(model.parameters()).device)},
        "bfloat16_autocast": {"autocast": torch.bfloat16}}
    if next(model.parameters()).is_cuda:
        variants["float16_autocast"] = {"autocast": torch.float16}
    for name, kw in variants.items():
        seconds, grads = run(**kw)
        out[name] = _compared(seconds, base_s, grads, base, drops(grads), base_drop)
    with torch.inference_mode():
        seconds, grads = run()
    out["inference_mode"] = _compared(seconds, base_s, grads, base, drops(grads), base_drop)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    seconds, grads = run()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    out["channels_last"] = _compared(seconds, base_s, grads, base, drops(grads), base_drop)
    return out


def _compared(seconds: float, base_s: float, grads: Tensor, base: Tensor, drop: Tensor,
              base_drop: Tensor) -> dict[str, Any]:
    shared = int((drop & base_drop).sum())
    return {"s": round(seconds, 3), "vs_default": round(seconds / base_s, 3),
            "max_abs_diff": float((grads.float() - base).abs().max()),
            "dropped": int(drop.sum()),
            "share_of_default_drops": round(shared / max(int(base_drop.sum()), 1), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    have_cifar = bool(os.environ.get("EPIC_DATA_DIR"))
    p.add_argument("--dataset", default="cifar10" if have_cifar else "digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--subset", type=int, default=10000, help="training examples used")
    p.add_argument("--test-subset", type=int, default=10000, help="test examples evaluated")
    p.add_argument("--model", default="convnet")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--channels-last", action="store_true",
                   help="training batches in channels-last format (the trainer's option)")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embedding-variants", action="store_true",
                   help="also time the round's embedding pass other ways (batch sizes, "
                        "inference_mode, channels-last, autocast) against the default")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    train_data, test_data = load_dataset(args.dataset, args.data_dir)
    train_data = train_data.subset(torch.arange(min(args.subset, len(train_data))))
    test_data = test_data.subset(torch.arange(min(args.test_subset, len(test_data))))
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = build_model(args.model, num_classes=train_data.num_classes,
                        in_channels=train_data.shape[0], mean=train_data.mean,
                        std=train_data.std).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    generator = torch.Generator().manual_seed(args.seed)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    parts = dict.fromkeys(("batches", "augment", "forward_backward", "optimizer_step"), 0.0)
    model.train()
    batches = iterate_batches(train_data, batch_size=args.batch_size, shuffle=True,
                              generator=generator, device=device)
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        sync()
        now = time.perf_counter()
        parts[part] += now - clock
        clock = now

    for x, y, _ in batches:  # the time to draw a batch is counted when it arrives
        lap("batches")
        x = augment_batch(x, train_data.augment, generator=generator)
        lap("augment")
        if args.channels_last:
            x = channels_last_on_cpu(x)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        lap("forward_backward")
        optimizer.step()
        lap("optimizer_step")
    parts["evaluate"] = _timed(lambda: evaluate(model, test_data))[0]
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    parts["checkpoint"] = _timed(lambda: torch.save(state, io.BytesIO()))[0]
    epoch = sum(parts.values())
    embed_s, (grads, labels) = _timed(lambda: gradient_embeddings(model, train_data))
    select_s = _timed(lambda: find_isolated(grads, labels, args.fraction))[0]
    out = {
        "dataset": args.dataset, "train_examples": len(train_data),
        "test_examples": len(test_data), "model": args.model, "batch_size": args.batch_size,
        "channels_last": args.channels_last,
        "device": str(device), "threads": torch.get_num_threads(),
        "epoch_s": round(epoch, 2),
        "seconds": {k: round(v, 3) for k, v in parts.items()},
        "share": {k: round(v / epoch, 3) for k, v in parts.items()},
        "round_embed_s": round(embed_s, 3), "round_select_s": round(select_s, 3),
        "round_share_of_epoch": round((embed_s + select_s) / epoch, 3),
    }
    if args.embedding_variants:
        out["embedding_variants"] = embedding_variants(model, train_data, args.fraction, sync)
    if not args.json:
        for k, v in out.items():
            print(f"{k:>22}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
