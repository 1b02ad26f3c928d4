"""The sweep report: the comparison table (``tables``), the figures (``plots``) and the rendering of
``report.md`` / ``report.html`` with the headline claims (``render``).
"""

from icldistill._lazy import lazy_exports

_EXPORTS = {
    "plots": (
        "FigureResult", "figure_unsupported_reason", "plot_accuracy_vs_k", "plot_memory_vs_k",
        "plot_id_vs_ood", "plot_alpha_curve", "plot_hans_heatmap", "make_figures",
    ),
    "render": (
        "Claim", "headline_claims", "render_markdown", "render_html", "write_report",
    ),
    "tables": (
        "is_ood_eval", "in_domain_and_ood", "comparison_table", "markdown_table",
        "comparison_markdown",
    ),
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
