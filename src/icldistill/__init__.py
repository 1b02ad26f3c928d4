"""icldistill: in-context learning distillation.

A teacher that sees k demonstrations is distilled into a student that answers without them. The
public API: :func:`icldistill.methods.icl.run_icl`, :func:`icldistill.methods.pbft.run_pbft`,
:func:`icldistill.methods.distill.run_distill`, with options from :mod:`icldistill.config`.
"""

__version__ = "0.1.0"
