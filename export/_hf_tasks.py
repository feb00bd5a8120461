"""Hugging Face tasks: a ``save_pretrained`` folder or a PreTrainedModel and a task name become
an ExportSpec (export/_hf.py without a cache, export/_hf_generation.py with one), as
``optimum-cli export onnx --model DIR --task T`` does."""

from __future__ import annotations

import contextlib
from pathlib import Path

from torch import nn

from ._errors import ExportError
from ._hf import spec_from_pretrained
from ._hf_generation import WITH_PAST, spec_for_generation

# Tested with transformers 5.24 (pyproject's [hf] extra); its exporter API is experimental.
TASKS = {
    "feature-extraction": "AutoModel",
    "text-generation": "AutoModelForCausalLM",
    "text-generation-with-past": "AutoModelForCausalLM",  # with its KV cache: _hf_generation.py
}
# Optimum's names for the same tasks.
TASK_SYNONYMS = {
    "default": "feature-extraction",
    "causal-lm": "text-generation",
    "causal-lm-with-past": "text-generation-with-past",
}

def load_pretrained(folder: str | Path, task: str | None = None):
    """(model, task) from a ``save_pretrained`` folder; the task defaults from the config's
    architectures (``*ForCausalLM``/``*LMHeadModel``: text-generation, else feature-extraction)."""
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} holds no config.json: not a save_pretrained folder", stage=1)
    config = transformers.AutoConfig.from_pretrained(folder)
    task = resolve_task(task, config)
    loader = getattr(transformers, TASKS[task])
    try:
        with _no_progress_bar():
            model = loader.from_pretrained(folder)
    except (ValueError, OSError) as err:
        raise ExportError(f"cannot load {folder} for {task}: {err}", stage=1) from err
    return model, task


@contextlib.contextmanager
def _no_progress_bar():
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def resolve_task(task: str | None, config) -> str:
    if task is None:
        archs = getattr(config, "architectures", None) or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        return "text-generation" if causal else "feature-extraction"
    task = TASK_SYNONYMS.get(task, task)
    if task not in TASKS:
        raise ExportError(
            f"unknown task {task!r}; known tasks: {', '.join([*TASKS, *TASK_SYNONYMS])}",
            stage=1,
        )
    return task


def spec_from_folder(folder: str | Path, task: str | None = None, **kwargs):
    """ExportSpec of a ``save_pretrained`` folder for ``task``; `attnx check` rebuilds it from
    the manifest's source."""
    model, task = load_pretrained(folder, task)
    folder = Path(folder).resolve()
    source = {
        "target": f"hf:{folder}",
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "task": task,
        "config": {"model_type": model.config.model_type},
    }
    kwargs.setdefault("name", folder.name)
    return spec_for_task(model, task, source=source, **kwargs)


def spec_for_task(model: nn.Module, task: str | None, **kwargs):
    """ExportSpec of a PreTrainedModel for ``task``: text-generation-with-past exports it with
    its KV cache (export/_hf_generation.py); any other task, or None, as it computes."""
    if task is not None and resolve_task(task, model.config) == WITH_PAST:
        unused = sorted(k for k in ("example_inputs", "input_maker", "value_ranges")
                        if kwargs.get(k) is not None)
        if unused:
            raise ExportError(f"{WITH_PAST} makes its own inputs (generation's padding, "
                              f"positions and past); drop {', '.join(unused)}", stage=1)
        kept = {k: v for k, v in kwargs.items() if k in ("dims", "name", "tolerance", "source")}
        return spec_for_generation(model, **kept)
    return spec_from_pretrained(model, **kwargs)
