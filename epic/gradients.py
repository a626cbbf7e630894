"""Per-example embeddings from one eval-mode pass: last-layer gradients, features, logits.

The examples may come in any of the shapes a PyTorch user has them:

- an :class:`~epic.data.ImageData` (this library's in-memory sets; uint8 images scaled to
  ``[0, 1]``),
- any map-style ``Dataset`` whose items are ``(x, y)`` or ``(x, y, ...)``: the kept items are
  read in index order and collated with ``default_collate``,
- a ``DataLoader`` over a map-style dataset: its dataset is read the same way, with the
  loader's batch size, workers and collate function (its sampler and shuffling are not used),
- any other iterable of ``(x, y)`` or ``(x, y, index)`` batches (a loader over an
  ``IterableDataset``, a list of batches, a generator). With ``(x, y)`` batches the rows are
  numbered in the order they come, so they must not be shuffled; with ``(x, y, index)``
  batches, ``index`` gives each row's position in the training set, in any order.

The embedding pass must see the examples without augmentation: pass a second dataset or
loader built with the evaluation transforms over the same files, in the same order. The model
runs in eval mode under ``torch.no_grad`` and its mode is restored afterwards, also when the
pass fails. On the CPU, image batches ``(B, C, H, W)`` are passed in channels-last memory
format, which the CPU's convolutions run faster on. ``logits_fn(model, x)`` maps a batch to
logits for models that return something else (a dict, a tuple). The embeddings are collected
on ``store`` (default: the model's device); pass ``store="cpu"`` when ``N x C`` floats would
crowd the accelerator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from epic.data import ImageData, channels_last_on_cpu, inference_batch_size, iterate_batches
from epic.models import eval_mode

__all__ = ["Examples", "LogitsFn", "feature_embeddings", "gradient_embeddings",
           "count_examples", "logit_embeddings", "logit_gradients"]

#: Anything the embedding functions accept as the training examples (see the module docs).
Examples: TypeAlias = "ImageData | Dataset[Any] | Iterable[Any]"
#: ``logits_fn(model, x)``: logits ``(B, C)`` of a batch ``x``.
LogitsFn: TypeAlias = Callable[[nn.Module, Any], Tensor]


def count_examples(data: Examples) -> int | None:
    """How many examples ``data`` holds (a ``DataLoader``: its dataset's); None for iterables
    of batches, whose size is unknown until they are read."""
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, ImageData) or _is_map_style(data):
        return len(data)  # type: ignore[arg-type]
    return None


def _is_map_style(data: object) -> bool:
    return (isinstance(data, Dataset) and not isinstance(data, IterableDataset)
            and isinstance(data, Sized))


def _to(x: Any, device: torch.device) -> Any:
    """``x`` (a tensor, or a list / tuple / dict of them) moved to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _rows(x: Any, rows: Tensor) -> Any:
    """The rows ``rows`` of a batch ``x`` (a tensor, or a list / tuple / dict of them)."""
    if isinstance(x, Tensor):
        return x[rows.to(x.device)]
    if isinstance(x, (list, tuple)):
        return type(x)(_rows(v, rows) for v in x)
    if isinstance(x, dict):
        return {k: _rows(v, rows) for k, v in x.items()}
    raise TypeError(f"cannot select rows of a batch of type {type(x).__name__}")


def _integral(t: Tensor) -> bool:
    """Integers, not booleans, floats or complex numbers (which ``.long()`` would convert)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _tensor(value: Any, message: str) -> Tensor:
    """``torch.as_tensor(value)``, or a TypeError with ``message`` and what ``value`` is
    (strings, such as class or file names, are not numbers)."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        sample = value[0] if isinstance(value, (list, tuple)) and value else value
        raise TypeError(f"{message}; got {type(sample).__name__} {sample!r:.40}") from None


def _split(batch: Any, where: str) -> tuple[Any, Tensor, Tensor | None]:
    """``(x, y, index or None)`` of one batch or item."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError(f"{where} must be (x, y) or (x, y, index), got {type(batch).__name__}")
    y = _tensor(batch[1], f"{where}: labels must be integer class indices 0..C-1 (map class "
                          f"names to indices first)")
    index = (_tensor(batch[2], f"{where}: the third element must be the examples' integer "
                               f"indices in the training set (items (x, y, file name) are not "
                               f"read: return (x, y))") if len(batch) > 2 else None)
    if y.dim() == 0 and _integral(y):
        raise TypeError(f"{where} is one example (x, y), not a batch: a list of examples is not "
                        f"a Dataset; pass a map-style Dataset, or batch the list with "
                        f"torch.utils.data.DataLoader(examples, batch_size=128)")
    if not _integral(y) or y.dim() != 1:
        raise TypeError(f"{where}: labels must be a 1-d integer batch, got {y.dtype} "
                        f"{tuple(y.shape)}")
    if index is not None and (not _integral(index) or index.shape != y.shape):
        raise TypeError(f"{where}: the third element must be the examples' integer indices, "
                        f"got {index.dtype} {tuple(index.shape)}")
    return batch[0], y.long(), None if index is None else index.long().cpu()


def _loader_over(data: Dataset[Any] | DataLoader[Any], index: Tensor, batch_size: int
                 ) -> DataLoader[Any]:
    """A loader over the examples ``index`` of a map-style dataset, in that order: a
    DataLoader keeps its batch size, workers and collate function, not its sampler."""
    if isinstance(data, DataLoader):
        return DataLoader(Subset(data.dataset, index.tolist()),
                          batch_size=data.batch_size or batch_size, num_workers=data.num_workers,
                          collate_fn=data.collate_fn, pin_memory=data.pin_memory,
                          worker_init_fn=data.worker_init_fn,
                          multiprocessing_context=data.multiprocessing_context)
    return DataLoader(Subset(data, index.tolist()), batch_size=batch_size)


def _batches(data: Examples, *, keep: Tensor | None, batch_size: int, device: torch.device
             ) -> Iterator[tuple[Any, Tensor, Tensor]]:
    """``(x, y, index)`` batches of the kept examples of ``data``, ``x`` and ``y`` on
    ``device``, ``index`` int64 on the CPU."""
    if isinstance(data, ImageData):
        yield from iterate_batches(data, batch_size=batch_size, keep=keep, device=device)
        return
    n = count_examples(data)
    if n is not None:  # a map-style dataset, or a DataLoader over one: read the kept rows
        if keep is not None and keep.shape != (n,):
            raise ValueError(f"keep-mask covers {keep.numel()} examples, data has {n}")
        index = torch.arange(n) if keep is None else keep.cpu().nonzero().squeeze(1)
        offset = 0
        for b, batch in enumerate(_loader_over(data, index, batch_size)):  # type: ignore[arg-type]
            x, y, _ = _split(batch, f"batch {b}")
            yield _to(x, device), y.to(device), index[offset:offset + len(y)]
            offset += len(y)
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"cannot embed a {type(data).__name__}: pass an ImageData, a map-style "
                        f"Dataset, or an iterable of (x, y) batches")
    offset = 0
    for b, batch in enumerate(data):
        x, y, idx = _split(batch, f"batch {b}")
        if idx is None:
            idx = torch.arange(offset, offset + len(y))
        offset += len(y)
        if keep is not None:
            if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(keep)):
                raise ValueError(f"batch {b} holds an index outside the {len(keep)} examples "
                                 f"of the keep-mask")
            rows = keep.cpu()[idx].nonzero().squeeze(1)
            if len(rows) < len(idx):
                x, y, idx = _rows(x, rows), y[rows], idx[rows]
        if len(idx):
            yield _to(x, device), y.to(device), idx


@torch.no_grad()
def _embed(model: nn.Module, data: Examples, fn: Callable[[Any, Tensor], Tensor], *,
           keep: Tensor | None, batch_size: int | None, device: torch.device | str | None,
           store: torch.device | str | None, autocast: torch.dtype | None = None
           ) -> tuple[Tensor, Tensor, Tensor]:
    """``fn(x, y)`` for every kept example, with labels and dataset indices, in index order;
    the model runs under ``torch.autocast`` to ``autocast`` when given."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    store = device if store is None else torch.device(store)
    batch_size = batch_size or inference_batch_size(device)
    rows, labels, indices = [], [], []
    mixed = (torch.autocast(device.type, dtype=autocast) if autocast is not None
             else contextlib.nullcontext())
    with eval_mode(model):
        for x, y, idx in _batches(data, keep=keep, batch_size=batch_size, device=device):
            if isinstance(x, Tensor):
                x = channels_last_on_cpu(x)
            with mixed:
                row = fn(x, y)
            rows.append(row.float().to(store))
            labels.append(y.to(store))
            indices.append(idx)
    if not rows:
        return (torch.empty(0, 0, device=store), torch.empty(0, dtype=torch.long, device=store),
                torch.empty(0, dtype=torch.long))
    index = torch.cat(indices)
    order = index.argsort()
    index = index[order]
    if len(index) > 1 and bool((index[1:] == index[:-1]).any()):
        raise ValueError("the data yielded some examples twice (a sampler that pads, such as "
                         "DistributedSampler's, or repeated indices)")
    expected = int(keep.sum()) if keep is not None else count_examples(data)
    if expected is not None and len(index) != expected:
        raise ValueError(f"the data yielded {len(index)} of the {expected} examples to embed "
                         f"(drop_last, a sampler that skips examples, or a wrong keep-mask)")
    on = order.to(store)
    return torch.cat(rows)[on], torch.cat(labels)[on], index


def _kept_features(data: Examples, features: Tensor, keep: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
    """The rows of precomputed ``features`` ``(N, F)`` that ``keep`` selects, and their labels."""
    if not isinstance(data, ImageData):
        raise TypeError("precomputed features need the examples as an ImageData")
    if features.shape[0] != len(data):
        raise ValueError(f"features cover {features.shape[0]} examples, data has {len(data)}")
    rows = torch.arange(len(data)) if keep is None else keep.cpu().nonzero().squeeze(1)
    return (features[rows.to(features.device)],
            data.labels[rows.to(data.labels.device)].to(features.device))


@torch.no_grad()
def _from_features(model: nn.Module, data: Examples, features: Tensor,
                   fn: Callable[[Tensor, Tensor], Tensor], keep: Tensor | None
                   ) -> tuple[Tensor, Tensor]:
    """``fn(logits, labels)`` from precomputed features: only ``model.classifier`` runs."""
    feats, labels = _kept_features(data, features, keep)
    head: nn.Module = getattr(model, "classifier")  # noqa: B009
    with eval_mode(head):
        return fn(head(feats).float(), labels), labels


def logit_gradients(logits: Tensor, y: Tensor) -> Tensor:
    """The cross-entropy's gradient with respect to ``logits`` ``(N, C)`` at labels ``y``
    ``(N,)``: ``softmax(logits) - onehot(y)``, EPIC's embedding of each example."""
    classes = logits.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise ValueError(f"label {bad} is outside 0..{classes - 1}: the model gives {classes} "
                         f"logits")
    return torch.softmax(logits, dim=1) - F.one_hot(y, classes).to(logits.dtype)


def _logits(model: nn.Module, logits_fn: LogitsFn | None) -> Callable[[Any], Tensor]:
    def run(x: Any) -> Tensor:
        out = model(x) if logits_fn is None else logits_fn(model, x)
        if not isinstance(out, Tensor) or out.dim() != 2:
            what = (f"a {type(out).__name__}" if not isinstance(out, Tensor)
                    else f"a tensor of shape {tuple(out.shape)}")
            raise TypeError(f"{'logits_fn' if logits_fn else 'the model'} returned {what}, not "
                            f"logits (B, C)" + ("" if logits_fn else ": pass logits_fn, e.g. "
                                                "logits_fn=lambda m, x: m(x)['logits']"))
        return out.float()

    return run


def gradient_embeddings(
    model: nn.Module,
    data: Examples,
    *,
    keep: Tensor | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    features: Tensor | None = None,
    logits_fn: LogitsFn | None = None,
    store: torch.device | str | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Cross-entropy gradients w.r.t. the logits, ``softmax(z_i) - onehot(y_i)``, per example.

    This is the last-layer gradient EPIC clusters (paper Sec. 3.5, after Katharopoulos & Fleuret
    2018): it upper-bounds the full gradient difference between examples up to a constant and
    costs one forward pass. The model runs in eval mode on the examples as given (see the
    module docs for the accepted shapes of ``data``, and turn augmentation off); its training
    mode is restored afterwards. No parameter gradients are computed.

    Args:
        model: maps a batch to logits ``(B, C)`` (or see ``logits_fn``); ImageData batches
            are float images in ``[0, 1]``.
        data: the examples: an ImageData, a map-style Dataset, or an iterable of batches.
        keep: optional bool mask ``(N,)`` over the training set; only those examples are
            embedded.
        batch_size: examples per batch (default: :func:`epic.data.inference_batch_size` of
            the device; a DataLoader keeps its own).
        device: where to run (default: the model's device).
        features: optional ``model.features`` of every example of an ImageData, ``(N, F)``,
            computed once for a frozen body (transfer learning); then only
            ``model.classifier`` runs (results on the features' device).
        logits_fn: ``logits_fn(model, x)`` gives the logits when ``model(x)`` does not.
        store: where the embeddings are collected (default: ``device``).
        autocast: run the model under ``torch.autocast`` to this dtype (``torch.bfloat16``,
            ``torch.float16`` on CUDA); the gradients are formed and kept in float32. Off by
            default: on CPUs without bfloat16 arithmetic it is slower, not faster
            (``benchmarks/epoch_profile.py --embedding-variants``).

    Returns:
        ``(grads, labels)``: ``(M, C)`` float32 and ``(M,)`` int64, rows in index order of the
        kept examples.

    Example:
        >>> from epic.data import load_digits
        >>> from epic.models import build_model
        >>> train, _ = load_digits()
        >>> m = build_model("convnet", num_classes=10, in_channels=1, mean=train.mean,
        ...                 std=train.std)
        >>> g, y = gradient_embeddings(m, train)
        >>> g.shape
        torch.Size([1347, 10])
    """
    if features is not None:
        return _from_features(model, data, features, logit_gradients, keep)
    logits = _logits(model, logits_fn)
    grads, labels, _ = _embed(model, data, lambda x, y: logit_gradients(logits(x), y),
                              keep=keep, batch_size=batch_size, device=device, store=store,
                              autocast=autocast)
    return grads, labels


def feature_embeddings(
    model: nn.Module,
    data: Examples,
    *,
    keep: Tensor | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    features: Tensor | None = None,
    store: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Penultimate features ``model.features(x)``, ``(M, F)``, and labels ``(M,)``.

    Same conventions as :func:`gradient_embeddings`; ``model`` must have ``features``.
    """
    if features is not None:
        return _kept_features(data, features, keep)
    extract: Callable[[Any], Tensor] = getattr(model, "features")  # noqa: B009
    feats, labels, _ = _embed(model, data, lambda x, _: extract(x).float(), keep=keep,
                              batch_size=batch_size, device=device, store=store)
    return feats, labels


def logit_embeddings(
    model: nn.Module,
    data: Examples,
    *,
    keep: Tensor | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    features: Tensor | None = None,
    logits_fn: LogitsFn | None = None,
    store: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Logits ``(M, C)`` and labels ``(M,)``; same conventions as :func:`gradient_embeddings`."""
    if features is not None:
        return _from_features(model, data, features, lambda logits, _: logits, keep)
    logits = _logits(model, logits_fn)
    out, labels, _ = _embed(model, data, lambda x, _: logits(x), keep=keep,
                            batch_size=batch_size, device=device, store=store)
    return out, labels
