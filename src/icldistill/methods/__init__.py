"""The three methods: ICL evaluation, pattern-based fine-tuning and context distillation.

Each supplies what differs (its data, its loss, its teacher); they share the setup in ``common``,
the scoring in ``inference`` and the one training loop in ``train``.
"""
