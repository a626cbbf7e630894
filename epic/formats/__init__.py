"""Poison exchange formats besides our own (:meth:`epic.poisons.PoisonSet.save`).

* **Benchmark layout**, the folder the public poisoning benchmark (Schwarzschild et al. 2021)
  and the Witches' Brew code (Geiping et al. 2021) exchange:

  - ``poisons.pickle``: list of ``(image, label)``, one per poison, in base-index order;
  - ``base_indices.pickle``: the training indices the poisons replace;
  - ``target.pickle``: ``(image, true label)`` of the target (a list of them for several);
  - ``source.pickle`` (backdoors): ``(trigger patch image, source class)``.

  Images are PIL images (what those codes write) or ``(H, W[, C])`` uint8 arrays. We add an
  ``epic.json`` sidecar (eps, classes, metadata), which other readers ignore, so that a set
  exported and imported again is identical.

* **MetaPoison-style single pickle**: one dict with the whole poisoned training set,
  ``xtrain`` ``(N, H, W, C)`` uint8 and ``ytrain``, the targets ``xtarget``, their labels
  ``ytarget`` and adversarial labels ``ytargetadv``, plus ``poison_indices``, ``eps`` and,
  for backdoors, ``trigger`` ``(h, w, C)``.

:mod:`epic.formats.registry` names them (and our own) for ``--poisons``, which reads any of
them, and ``epic craft --export``: :func:`read_poisons`, :func:`register_format`.

Every pickle here is read with :func:`epic.io.safe_pickle.safe_load`: only arrays, numbers,
strings, containers and a stand-in for ``PIL.Image.Image`` that copies mode, size and bytes
(no PIL code runs, no callable named by the file is ever called). A crafted pickle raises
:class:`~epic.io.safe_pickle.UnsafePickleError`.
"""

from epic.formats.benchmark import export_benchmark, import_benchmark
from epic.formats.metapoison import export_metapoison, import_metapoison
from epic.formats.registry import (
    FORMATS,
    PoisonFormat,
    read_poisons,
    register_format,
    write_poisons,
)
from epic.formats.untrusted import PilStandIn, read_untrusted_pickle

__all__ = ["FORMATS", "PilStandIn", "PoisonFormat", "export_benchmark", "export_metapoison",
           "import_benchmark", "import_metapoison", "read_poisons", "read_untrusted_pickle",
           "register_format", "write_poisons"]
