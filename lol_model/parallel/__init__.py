"""Several processes: the head-parallel (Ulysses) model (:mod:`.ulysses`), the distributed
runner and its checkpoints (:mod:`.runner`), and rank liveness (:mod:`.liveness`). Imports
:mod:`lol_model.streaming` and below."""
