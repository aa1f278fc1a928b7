"""`domaintune template show|check`: the chat template as training renders it, and one template everywhere."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape

from domaintune.cli.common import ConfigArg, OutputDirOpt, SetOpt, friendly_errors, load
from domaintune.errors import UserError


def register(app: typer.Typer) -> None:
    template_app = typer.Typer(help="Chat template: show a rendered training example; check it matches everywhere.")
    app.add_typer(template_app, name="template")
    template_app.command("show")(friendly_errors(show))
    template_app.command("check")(friendly_errors(check))


def _example_messages(cfg) -> list[dict]:
    train_file = cfg.layout.train_file
    if train_file.is_file():
        with train_file.open(encoding="utf-8") as handle:
            for line in handle:
                messages = json.loads(line).get("messages")
                if messages:
                    return messages
    from domaintune.model.template import PROBE

    return PROBE[1:3]  # one exchange, no system turn: Qwen3 rewrites earlier turns, Mistral moves the system text


def show(config: ConfigArg, set_: SetOpt = None, output_dir: OutputDirOpt = None) -> None:
    """Print a training example as training renders it: trained (loss) tokens inside [[...]], the rest masked.

    Example: domaintune template show examples/medical-zh.yaml
    """
    from domaintune.model.loader import load_tokenizer
    from domaintune.model.template import render_training_example

    cfg = load(config, set_, output_dir)
    model_dir = cfg.layout.model_dir
    tokenizer = load_tokenizer(cfg.model)
    source = f"{cfg.model.name_or_path}" + (" + model.chat_template" if cfg.model.chat_template else "")
    if (model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer, source = AutoTokenizer.from_pretrained(model_dir), f"{model_dir} (stored at training time)"
    example = render_training_example(tokenizer, _example_messages(cfg), cfg.train.max_length)
    out = Console(soft_wrap=True, highlight=False)
    out.print(f"template: {escape(source)}")
    out.print(f"end-of-turn token: {escape(', '.join(example.eot_tokens))}")
    out.print(f"tokens: {example.total_tokens}, trained on (inside [[...]]): {example.trained_tokens}")
    out.print(escape(example.marked()))


def check(config: ConfigArg, set_: SetOpt = None, output_dir: OutputDirOpt = None) -> None:
    """Fail (exit 2) where eval, export (merged folder, GGUF files) or serving would render a different prompt than
    training did. A GGUF is rendered by llama.cpp with the template stored in it, and its tokens and end-of-turn
    token are checked too.

    Example: domaintune template check examples/medical-zh.yaml
    """
    from domaintune.model.template import template_check

    cfg = load(config, set_, output_dir)
    layout = cfg.layout
    if not (layout.model_dir / "tokenizer_config.json").is_file():
        raise UserError(f"{layout.model_dir} has no tokenizer: run `domaintune train` first")
    ggufs = {f"export/gguf/{p.name}": p for p in sorted((layout.export_dir / "gguf").glob("*.gguf"))}
    result = template_check(cfg.model, layout.model_dir, {"export/merged": layout.export_dir / "merged"}, ggufs)
    out = Console(soft_wrap=True, highlight=False)
    for place in result.renders:
        out.print(f"{'DIFFERS' if place in result.differing else 'same   '} {escape(place)}")
        for problem in result.problems.get(place, []):
            out.print(f"        {escape(problem)}")
    if not result.ok:
        raise UserError(
            f"chat template differs from the one training used ({result.reference}) in: {', '.join(result.differing)}"
        )
    out.print("one template everywhere")
