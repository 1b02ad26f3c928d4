"""``icld export RUN/seed-N --output DIR``: the trained student as one plain model directory, with a model card.

LoRA is merged into the base weights; BitFit and full fine-tuning load their trained tensors into the
base. The directory holds safetensors weights and the tokenizer (``AutoModelForCausalLM.from_pretrained``
and a transformers ``pipeline`` load it), ``README.md`` (the model card) and ``icldistill.json`` (task,
pattern, label words), so that ``icld predict --model DIR`` needs no other flag.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icldistill.errors import ConfigError, IcldError, ModelError
from icldistill.methods.gen_export import generation_card, generation_meta
from icldistill.methods.gen_source import is_generation
from icldistill.methods.predict import portable_task
from icldistill.methods.trained import EXPORT_META, ModelSource, apply_trained, resolve_source
from icldistill.models.adapters import share_files, writing
from icldistill.models.loading import load_model
from icldistill.runtime.records import atomic_write_json, atomic_write_text
from icldistill.tasks.prompts import Pattern
from icldistill.tasks.registry import get_task

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 2  # 2: carries its task (task_definition), not only the task file's path
# Config switches that give every projection of a group a bias, by the layer names they cover (Llama family).
_BIAS_SWITCHES = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _biases_into_config(model: nn.Module, added: list[str], source: ModelSource) -> list[str]:
    """Make a BitFit ``add-bias`` model a plain architecture: switch its config to biased projections.

    The run added biases to some linear layers (``--lora-targets``) that the architecture has none on.
    Where the config has a switch covering those layers (Llama's ``attention_bias``/``mlp_bias``), it is
    turned on and the other layers of the group get zero biases (the function is unchanged), so the
    saved model loads with plain transformers. Otherwise the export is refused.
    """
    biased = {name.rsplit(".", 1)[0].split(".")[-1] for name in added}
    switched = []
    for switch, layers in _BIAS_SWITCHES.items():
        if not biased & set(layers):
            continue
        if not hasattr(model.config, switch):
            break
        setattr(model.config, switch, True)
        switched.append(switch)
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and m.bias is None and name.split(".")[-1] in layers:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
        biased -= set(layers)
    if biased:
        raise ModelError(
            f"{source.seed_dir}: the run added biases to {sorted(biased)}, which {model.config.model_type} models "
            "cannot hold in their standard architecture, so no plain model can be exported. Use the run itself "
            f"(icld predict --model {source.seed_dir}) or train with --peft lora.")
    return switched


def merged_model(source: ModelSource, cache_dir: str | None = None) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, notes): the run's base with its training applied and merged, fp32 on the CPU."""
    base = load_model(source.base, dtype="fp32", device="cpu", cache_dir=cache_dir)
    architecture = {name for name, _ in base.model.named_parameters()}
    model = apply_trained(base.model, source)
    notes = []
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        notes.append("LoRA adapter merged into the base weights")
    added = [name for name, _ in model.named_parameters() if name not in architecture]
    if added:  # BitFit --bitfit-fallback add-bias gave bias-free layers biases
        switched = _biases_into_config(model, added, source)
        notes.append(f"BitFit biases added by the run kept by turning on {', '.join(switched)} in the config")
    return model.eval(), base.tokenizer, notes


def export_run(run: str, output: str | Path, *, push_to_hub: str | None = None, private: bool = False,
               cache_dir: str | None = None) -> dict[str, Any]:
    """Write the merged model of training run ``run`` (a seed directory) to ``output``; optionally push it.

    The export is written into a new directory beside ``output`` and renamed into place, so a killed or
    failed (re-)export leaves the earlier export whole, never new weights beside old metadata.
    """
    source = resolve_source(run)
    if source.kind != "run":
        raise ConfigError(f"{run} is not a training run's seed directory (RUN/seed-N with seed_result.json); "
                          "icld export turns a PBFT, distillation or gen-distill run into a plain model.")
    out = Path(output).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_META).is_file())):
        raise ConfigError(f"--output {out} exists and is not an earlier export; choose an empty or new directory.")
    staging = _staging_dir(out)  # before the model loads: an unwritable --output fails at once
    try:
        model, tokenizer, notes = merged_model(source, cache_dir)
        meta = export_meta(source, notes)
        with writing(out, "the export"):
            model.save_pretrained(str(staging))
            tokenizer.save_pretrained(str(staging))
        share_files(staging)  # safetensors writes 0600; a shared export must be readable by a serving user
        atomic_write_text(staging / "README.md", model_card(source, meta), option="--output")
        atomic_write_json(staging / EXPORT_META, meta, option="--output")  # last: marks the export complete
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {"output": str(out), "meta": meta}
    if push_to_hub:
        result["hub"] = push(out, push_to_hub, private=private)
    return result


def _staging_dir(out: Path) -> Path:
    """A fresh directory beside ``out`` (same file system, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise ConfigError(f"Cannot write beside --output {out}: {exc.strerror or exc}. Choose a writable "
                          "directory.") from None


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the complete export to ``out``; an earlier export there is moved aside first and then removed."""
    os.chmod(staging, 0o777 & ~_umask_now())  # mkdtemp makes 0700; the export is shared like any directory
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask_now() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_meta(source: ModelSource, notes: list[str]) -> dict[str, Any]:
    """What ``icldistill.json`` holds: everything ``icld predict`` needs, and for a reader what this is.

    ``task_definition`` (inputs, classes, id column, pattern and label words) lets the export answer on a
    machine that has not its task file; ``task_ref`` is where the task was found when it was exported.
    """
    if is_generation(source):  # a generation task: methods.gen_export writes what it carries
        return generation_meta(source, notes, EXPORT_FORMAT)
    run, seed = source.run_record or {}, source.seed_record or {}
    config = run.get("config", {})
    definition = _task_definition(run)
    return {
        "format": EXPORT_FORMAT,
        "task": definition["name"], "task_ref": run.get("task"), "task_definition": definition,
        "classes": run.get("classes"), "pattern": run.get("pattern"),
        "label_words": (run.get("pattern") or {}).get("label_words"),
        "label_score": config.get("label_score", "sum"),
        "method": run.get("method"), "seed": source.seed, "base_model": (seed.get("student") or {}).get("name"),
        "base_fingerprint": (seed.get("student") or {}).get("fingerprint"),
        "teacher": config.get("teacher") if run.get("method") == "distill" else None,
        "seeds_in_run": len(run.get("seeds") or {}) or None,
        "run": str(source.seed_dir), "notes": notes,
    }


def _task_definition(run: dict[str, Any]) -> dict[str, Any]:
    """The run's task as :func:`portable_task` writes it; from the run record alone where the task is gone."""
    pattern = run.get("pattern") or {}
    resolved = Pattern(pattern.get("name") or "custom", pattern.get("template") or "",
                       tuple(pattern.get("label_words") or ()))
    try:
        return portable_task(get_task(run.get("task") or ""), resolved)
    except IcldError as exc:
        logger.warning("task %s is not found (%s); the export carries what its run record holds", run.get("task"), exc)
    ref = str(run.get("task") or "task")
    fields = sorted({name for _, name, _, _ in string.Formatter().parse(resolved.template) if name})
    return {"name": Path(ref).stem if ref.endswith((".yaml", ".yml")) else ref, "fields": fields,
            "classes": list(run.get("classes") or []), "id_column": "id", "strip": False, "label_column": "label",
            "content_free": {f: "N/A" for f in fields},
            "pattern": {"name": resolved.name, "template": resolved.template,
                        "label_words": list(resolved.label_words)}}


# Where a packaged model's weights come from, for specs without an ``upstream`` field (helper "qwen" adds one).
_UPSTREAM = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "gemma3-270m": "google/gemma-3-270m"}


def _packaged(base: str | None) -> Any:
    from icldistill.models.packaged import PACKAGED_MODELS

    return PACKAGED_MODELS.get(base or "")


def _licence(base: str | None) -> str:
    spec = _packaged(base)
    return spec.licence if spec else "that of the base model (see its own model card)"


def upstream_id(base: str | None) -> str | None:
    """The hub id a card's ``base_model`` names: a packaged model's upstream repository, else the base as given."""
    spec = _packaged(base)
    if spec is None:
        return base
    return getattr(spec, "upstream", None) or _UPSTREAM.get(spec.name) or base


def _plural(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _metric_lines(run: dict[str, Any], seed_record: dict[str, Any]) -> list[str]:
    lines = ["| evaluation set | n | accuracy (this seed) | run mean over seeds [95% interval] | OOD accuracy |",
             "|---|---|---|---|---|"]
    for name, metrics in (seed_record.get("eval") or {}).items():
        agg = (run.get("aggregate") or {}).get(name, {}).get("accuracy") or {}
        interval = ""
        if agg.get("ci95") is not None:
            interval = f" [{agg['mean'] - agg['ci95']:.3f}, {agg['mean'] + agg['ci95']:.3f}]"
        mean = (f"{agg['mean']:.3f}{interval} ({_plural(agg.get('n_seeds', 1), 'seed')})"
                if agg.get("mean") is not None else "-")
        ood = metrics.get("ood_accuracy")
        lines.append(f"| {name} | {metrics.get('n')} | {metrics.get('accuracy', float('nan')):.3f} | {mean} | "
                     f"{'-' if ood is None else f'{ood:.3f}'} |")
    return lines


def model_card(source: ModelSource, meta: dict[str, Any]) -> str:
    """The exported model's ``README.md``: what it is, how it was made, how well it did, how to use it."""
    if meta.get("kind") == "generation":
        return generation_card(source, meta, upstream_id(meta["base_model"]), _licence(meta["base_model"]))
    run, seed = source.run_record or {}, source.seed_record or {}
    config = run.get("config", {})
    pattern = run.get("pattern") or {}
    base = meta["base_model"]
    method = {"distill": "context distillation", "pbft": "pattern-based fine-tuning"}.get(run.get("method"),
                                                                                       run.get("method"))
    if run.get("method") == "distill":  # every demonstration the teacher saw, over its contexts
        labelled = len({d for context in seed.get("demonstration_contexts", []) for d in context})
    else:
        labelled = len(seed.get("train_examples", []))
    words = ", ".join(f"{c} -> {w!r}" for c, w in zip(run.get("classes") or [], pattern.get("label_words") or []))
    trained = seed.get("trainable") or {}
    upstream = upstream_id(base)
    task_name = meta.get("task") or run.get("task")
    front = ["---", f"license: {'apache-2.0' if _licence(base) == 'Apache-2.0' else 'other'}",
             f"base_model: {upstream}", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [icldistill, in-context-learning-distillation]", "---"]
    lines = front + [
        f"# {task_name} student ({method}) from {upstream}", "",
        f"Made with icldistill by {method} and exported from `{source.seed_dir}` (seed {source.seed}).",
        "", "## Model", "",
        f"- Base model: `{upstream}`"
        + (f" (icldistill's packaged `{base}`: its GGUF weights dequantised)" if upstream != base else "")
        + f" (licence: {_licence(base)}; the base model's licence applies to these weights)",
    ]
    if run.get("method") == "distill":
        lines.append(f"- Teacher: `{config.get('teacher')}` with {config.get('shots')} demonstrations in its prompt; "
                     f"loss alpha * KL + (1 - alpha) * CE with alpha = {config.get('alpha')}, "
                     f"T = {config.get('temperature')}, "
                     f"KL over the {config.get('kl_space')} distribution")
    queries_labelled = run.get("method") == "distill" and config.get("alpha", 0) < 1
    lines += [
        f"- Task: `{task_name}`; classes {', '.join(run.get('classes') or [])}",
        f"- Pattern `{pattern.get('name')}`: `{pattern.get('template')!r}`; label words {words}",
        f"- Labelled examples used: {labelled} (the k demonstrations"
        + (f"; plus {config.get('train_queries')} training queries whose labels enter the CE term"
           if queries_labelled else "")
        + ")",
        f"- What trained: {trained.get('method')} ({trained.get('trainable_parameters')} of "
        f"{trained.get('total_parameters')} parameters); "
        + "; ".join(meta["notes"] or ["no merge needed"]),
        f"- Training: {config.get('epochs')} epochs, lr {config.get('lr')}, batch {config.get('train_batch_size')}, "
        f"warm-up {config.get('warmup_ratio')}, weight decay {config.get('weight_decay')}, dtype {config.get('dtype')}",
        "", "## Evaluation", "",
        "Restricted accuracy (argmax over the label words) of this seed, and the mean over the run's seeds with its "
        "95% t-interval where there are several.", "",
        *_metric_lines(run, seed),
        "", "## Use", "",
        "The model answers the pattern-rendered input with its label word; a class's score is the log-probability "
        f"of its whole word after the prompt ({'mean' if config.get('label_score') == 'mean' else 'sum'} over the "
        "word's tokens, prompt and word tokenized together as lm-evaluation-harness does):", "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(DIR); model = AutoModelForCausalLM.from_pretrained(DIR)",
        f"prompt = {pattern.get('template')!r}.format(...)",
        "def score(word):",
        "    n = len(tok(prompt)['input_ids'])",
        "    ids = tok(prompt + word, return_tensors='pt')['input_ids']",
        "    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)",
        "    lp = logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]]",
        f"    return lp.{'mean' if config.get('label_score') == 'mean' else 'sum'}()",
        f"scores = [score(w) for w in {list(pattern.get('label_words') or [])!r}]",
        "```", "",
        "or `icld predict --model DIR --input rows.jsonl --output answers.jsonl` (task, pattern and label words come "
        f"from `{EXPORT_META}`).", "",
    ]
    return "\n".join(lines)


def push(directory: Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an export to the Hugging Face hub (needs network access and a token; not exercised offline)."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("--push-to-hub needs huggingface_hub: pip install huggingface_hub.") from None
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="icld export")
    except Exception as exc:  # network, auth and permission errors come in many types
        raise ModelError(f"Uploading {directory} to the hub as {repo_id} failed ({exc}); check the network, "
                         "`huggingface-cli login` and the repository name. The local export is complete.") from None
    return str(getattr(info, "commit_url", info))
