"""Evaluation suites: the cognitive-core suite (recall vs. reading), synthetic worlds, probes.

Modules (import what you need; this package imports nothing heavy on its own):

* :mod:`cogcore.eval.world` — synthetic world, its questions and annotated training records;
* :mod:`cogcore.eval.recall_detector` — recall-token weights for arbitrary text;
* :mod:`cogcore.eval.probes` — real-world fact probes and their scoring;
* :mod:`cogcore.eval.core` — ``evaluate_core``, ``EvalReport``, ``plot_core``.
"""
