"""The streaming runtime: settings (:mod:`.settings`), cache presets (:mod:`.presets`), prompt
schedules (:mod:`.prompts`), the flow-matching sampler (:mod:`.sampling`), the block's forwards
eager, compiled or captured (:mod:`.forward`), the stream and its one-block step
(:mod:`.stream`), outputs (:mod:`.outputs`, :mod:`.video`), checkpoints (:mod:`.checkpoint`),
the memory estimate (:mod:`.memory`) and the driver that runs a stream to its outputs
(:mod:`.driver`). The seams are typed in :mod:`.interfaces`. Imports :mod:`lol_model.model` and
:mod:`lol_model.errors`."""
