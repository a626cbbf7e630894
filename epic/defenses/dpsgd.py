"""DP-SGD (Abadi et al. 2016) as a defense against poisoning (Hong et al. 2020), through Opacus
(``pip install 'epic-defense[dp]'``): every example's gradient is clipped, the clipped sum of a
batch gets Gaussian noise, and the privacy spent is accounted.

No poisoning paper gives the clip and noise its DP-SGD rows used: the EPIC paper (Table 2)
names Hong et al. and states neither. The defaults here are clip 1 and noise multiplier 1; at
the paper's batch of 128 that puts noise of std 1/128 = 0.0078 on the averaged gradient, next
to the 0.01 of the batch-level clip-and-noise (clip 1, noise 0.01) of the poisoning toolbox of
Geiping et al. (:class:`~epic.defenses.ClipNoise`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from epic.distributed import world
from epic.protocol import Defense, RunFacts

__all__ = ["DPSGD", "group_norms"]

log = logging.getLogger(__name__)

_MISSING = "DP-SGD needs Opacus: pip install 'epic-defense[dp]' (or pip install opacus)"


def _opacus() -> Any:
    """The opacus package, or an ImportError naming the extra that brings it."""
    try:
        import opacus
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return opacus


def group_norms(module: nn.Module) -> list[str]:
    """Make ``module`` trainable by Opacus, in place; the names of the layers replaced.

    Every batch-norm layer whose parameters train becomes the group norm Opacus's
    ``ModuleValidator.fix`` gives for it (batch norm mixes the examples of a batch, so
    per-example gradients do not exist through it), holding the batch norm's own affine
    parameters (the same tensors, so an optimizer built over them still steps them); its
    running statistics are gone. In-place activations become out-of-place, as Opacus's
    backward hooks require; that changes no value. Frozen batch norms stay as they are.

    Raises:
        opacus.validators.errors.UnsupportedModuleError: a trained layer Opacus cannot
            compute per-example gradients for.
    """
    validators = _opacus().validators
    replaced = []
    for name, sub in list(module.named_modules()):
        if (name and isinstance(sub, nn.modules.batchnorm._BatchNorm)
                and any(p.requires_grad for p in sub.parameters(recurse=False))):
            norm = validators.ModuleValidator.fix(sub)
            if sub.affine:
                norm.weight, norm.bias = sub.weight, sub.bias
            module.set_submodule(name, norm)
            replaced.append(name)
    for sub in module.modules():
        if getattr(sub, "inplace", None) is True:
            sub.inplace = False  # type: ignore[assignment]
    training = module.training
    module.train()  # Opacus validates modules in training mode
    validators.ModuleValidator.validate(module, strict=True)
    module.train(training)
    return replaced


class DPSGD(Defense):
    """Differentially private SGD: per-example clipping, noise, and the privacy spent.

    The trained module is wrapped in Opacus's ``GradSampleModule`` (per-example gradients)
    and the trainer's SGD in its ``DPOptimizer``: every example's gradient is clipped to norm
    ``clip``, the batch's sum gets Gaussian noise of std ``noise * clip``, divided by the
    batch size, and the SGD step (momentum, weight decay and learning-rate schedule as
    configured) follows. Trained batch-norm layers become group norms first
    (:func:`group_norms`): the model :func:`epic.training.train` returns, and the ``model.pt`` it
    writes, have group norms there. In transfer learning only the last layer trains, on a
    frozen body, and nothing is converted.

    Privacy accounting: the RDP accountant of Opacus, for ``steps`` steps of sample rate
    ``batch_size / N``, at ``delta``. The trainer draws shuffled batches of a fixed size, each
    example once an epoch, not Poisson-subsampled ones; accounting them as Poisson sampling
    at that rate is the usual approximation (Opacus's and Abadi et al.'s analyses assume
    Poisson sampling; for shuffled batches the true epsilon can be larger). :meth:`facts`
    reports ``dp_epsilon`` (None when ``noise`` is 0: no guarantee) and ``dp_delta``.

    Not under ``torch.distributed``: Opacus's distributed optimizer is not wired in.

    Args:
        clip: per-example gradient norm bound (Opacus's ``max_grad_norm``).
        noise: noise multiplier: the noise std over ``clip``, on a batch's sum of gradients.
        delta: the delta of the reported (epsilon, delta) guarantee; keep it below 1 / N.
        seed: seed of the noise.

    Example:
        >>> defense = DPSGD(clip=1.0, noise=1.0, delta=1e-5)
        >>> # result = epic.training.train(model, train_data, test_data, defense=defense)
        >>> # result.summary["dp_epsilon"]
    """

    SETTINGS = ("clip", "noise", "delta", "seed")

    def __init__(self, *, clip: float = 1.0, noise: float = 1.0, delta: float = 1e-5,
                 seed: int = 0) -> None:
        if not clip > 0 or noise < 0 or not 0 < delta < 1:
            raise ValueError(f"need clip > 0, noise >= 0 and 0 < delta < 1, got {clip}, "
                             f"{noise}, {delta}")
        self.clip = clip
        self.noise = noise
        self.delta = delta
        self.seed = seed
        self._steps = 0
        self._sample_rate = 0.0
        self._module: Any = None
        self._generator: torch.Generator | None = None

    @classmethod
    def for_run(cls, run: RunFacts, *, clip: float = 1.0, noise: float = 1.0,
                delta: float = 1e-5) -> DPSGD:
        """DP-SGD with the noise drawn from the run's seed + 1, apart from the stream that
        orders the batches."""
        return cls(clip=clip, noise=noise, delta=delta, seed=run.seed + 1)

    @property
    def steps(self) -> int:
        """Noisy optimizer steps taken so far."""
        return self._steps

    def setup(self, model: nn.Module, trained: nn.Module, optimizer: torch.optim.Optimizer, *,
              num_examples: int, batch_size: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        opacus = _opacus()
        from opacus.optimizers import DPOptimizer

        if world()[1] > 1:
            raise ValueError("dp-sgd does not run under torch.distributed")
        replaced = group_norms(trained)
        if replaced:
            log.info("DP-SGD: batch norm -> group norm in %s", ", ".join(replaced))
        device = next(trained.parameters()).device
        self._generator = torch.Generator(device=device).manual_seed(self.seed)
        self._sample_rate = min(1.0, batch_size / max(num_examples, 1))
        self._module = opacus.GradSampleModule(trained, loss_reduction="mean")
        stepper = DPOptimizer(optimizer, noise_multiplier=self.noise, max_grad_norm=self.clip,
                              expected_batch_size=batch_size, loss_reduction="mean",
                              generator=self._generator)
        stepper.attach_step_hook(self._count)
        return self._module, stepper

    def _count(self, _: Any) -> None:
        self._steps += 1

    def epsilon(self) -> float | None:
        """The epsilon spent so far at :attr:`delta` (0 before any step; None without noise)."""
        if self._steps == 0:
            return 0.0
        if self.noise == 0:
            return None
        accountant = _opacus().accountants.RDPAccountant()
        accountant.history = [(self.noise, self._sample_rate, self._steps)]
        return float(accountant.get_epsilon(self.delta))

    def facts(self) -> dict[str, Any]:
        return {"dp_epsilon": self.epsilon(), "dp_delta": self.delta}

    def teardown(self) -> None:
        if self._module is not None:
            self._module._close()  # its hooks off the model, per-example gradients dropped
            self._module = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps": self._steps}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._steps = int(state["steps"])
        if self._generator is not None and "generator" in state:
            self._generator.set_state(state["generator"].cpu())
