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
===========================  ======================  ===================================
"""

from epic.attacks.base import AttackError, budget_count, choose_bases
from epic.attacks.feature import BullseyePolytope, FeatureCollision
from epic.attacks.gradient import GradientMatching, SleeperAgent, gradient_norms
from epic.attacks.patch import PatchBackdoor, make_trigger

ATTACKS = {"gm": GradientMatching, "bp": BullseyePolytope, "fc": FeatureCollision,
           "sa": SleeperAgent, "patch": PatchBackdoor}

__all__ = ["ATTACKS", "AttackError", "BullseyePolytope", "FeatureCollision", "GradientMatching",
           "PatchBackdoor", "SleeperAgent", "budget_count", "choose_bases", "gradient_norms",
           "make_trigger"]
