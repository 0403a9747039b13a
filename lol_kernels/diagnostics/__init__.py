"""Sink-collapse diagnostics (LoL): RoPE phase coherence, stream and attention metrics.

* :mod:`.coherence`: :func:`phase_coherence`, :func:`predict_collapse`,
  :func:`synchronized_events` on a :class:`~lol_kernels.RopeTable`.
* :mod:`.stream`: :func:`stream_metrics` (L2 to sink, collapse events, collapse score).
* :mod:`.homogenization`: per-head sink attention mass from
  :func:`.page_mass.paged_attention_page_mass`.
* :mod:`.cli`: ``lol diagnose`` (``python -m lol_kernels.diagnostics``).
"""

from .coherence import (
    count_runs,
    head_fraction_above,
    mean_coherence,
    phase_coherence,
    predict_collapse,
    synchronized_events,
)
from .homogenization import (
    Homogenization,
    homogenization,
    homogenization_over_blocks,
    sink_mass,
)
from .page_mass import paged_attention_page_mass
from .stream import StreamMetrics, l2_to_sink, stream_metrics

__all__ = ["Homogenization", "StreamMetrics", "count_runs", "head_fraction_above",
           "homogenization", "homogenization_over_blocks", "l2_to_sink", "mean_coherence",
           "paged_attention_page_mass", "phase_coherence", "predict_collapse", "sink_mass",
           "stream_metrics", "synchronized_events"]
