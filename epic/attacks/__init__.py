"""Poisoning attacks from the EPIC paper's evaluation (Yang et al., ICML 2022, Sec. 2.1, 4).

Every attack is a frozen dataclass of typed hyperparameters (defaults: the published ones,
source in its docstring) with a ``craft(...)`` method returning a validated
:class:`~epic.poisons.PoisonSet`:

===========================  ======================  ===================================
class                        scenario                craft(model, train, ...)
===========================  ======================  ===================================
:class:`GradientMatching`    from scratch            target, target_class, adversarial
:class:`BullseyePolytope`    transfer / fine-tuning  target, target_class, adversarial
:class:`FeatureCollision`    transfer                target, target_class, adversarial
:class:`SleeperAgent`        from scratch, backdoor  source_class, adversarial
:class:`PatchBackdoor`       any, backdoor           source_class, adversarial
:class:`BlendedBackdoor`     any, backdoor           source_class, adversarial
===========================  ======================  ===================================

:data:`ATTACKS` holds them by ``name`` (gm, bp, fc, sa, patch, blend); :func:`build_attack`
makes one from options and :func:`register_attack` adds another (docs/attacks.md, "Adding an
attack").
"""

from epic.attacks.base import AttackError, budget_count, choose_bases
from epic.attacks.feature import BullseyePolytope, FeatureCollision
from epic.attacks.gradient import GradientMatching, SleeperAgent, gradient_norms
from epic.attacks.patch import BlendedBackdoor, PatchBackdoor, make_trigger
from epic.attacks.registry import (
    ATTACKS,
    BackdoorAttack,
    TargetedAttack,
    attack_options,
    build_attack,
    craft_attack,
    is_backdoor,
    register_attack,
    uses_model,
)

__all__ = ["ATTACKS", "AttackError", "BackdoorAttack", "BlendedBackdoor", "BullseyePolytope",
           "FeatureCollision",
           "GradientMatching", "PatchBackdoor", "SleeperAgent", "TargetedAttack",
           "attack_options", "budget_count", "build_attack", "choose_bases", "craft_attack",
           "gradient_norms",
           "is_backdoor", "make_trigger", "register_attack", "uses_model"]
