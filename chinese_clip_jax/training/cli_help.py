"""``ccj-train --help``: what the command does, its recipes, the config keys with their defaults
and meanings, and examples, all read from the config the trainer uses, so it cannot go stale.

    print(help_text(base.get_config(), {"demo": "the README's demo", ...},
                    key_comments((base.get_config, ""), (data.default_data_config, "data."))))

Meanings are the comments written beside each key where the config is built (a trailing
``# ...`` on the key's line, else the comment block just above it), found with ``ast`` +
``tokenize`` in the source of the functions or modules given.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
from collections.abc import Mapping

__all__ = ["help_text", "key_comments"]

# Shown as one summary line each instead of key by key.
_FOLDED = ("model.text.", "model.vision.", "distributed.")


def _comments(source: str) -> dict[int, str]:
    """line number (1-based) -> the comment text on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _dotted(node) -> str | None:
    """``c.optimizer.lr`` -> "optimizer.lr"; ``c`` -> ""."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) else None


def key_comments(*sources) -> dict[str, str]:
    """{dotted key: meaning} from ``(function or module, key prefix)`` pairs (see the module
    docstring): assignments ``c.a.b = ...`` and dict literals (also inside a call, e.g.
    ``ConfigDict({...})``) with string keys, nested; in a module, the dict assigned to ``DEFAULTS``."""
    found: dict[str, str] = {}
    for obj, prefix in sources:
        source = textwrap.dedent(inspect.getsource(obj))
        lines, comments = source.splitlines(), _comments(source)

        def meaning(node, lines=lines, comments=comments) -> str:
            if node.end_lineno in comments and lines[node.end_lineno - 1].lstrip()[:1] != "#":
                return comments[node.end_lineno]
            above, n = [], node.lineno - 1  # the comment block just above
            while n in comments and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            return " ".join(above)

        def visit(value, key, stmt, found=found, meaning=meaning):
            if isinstance(value, ast.Call) and len(value.args) == 1:
                value = value.args[0]
            if isinstance(value, ast.Dict):
                for k, v in zip(value.keys, value.values, strict=True):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        item = ast.Tuple(elts=[], lineno=k.lineno, end_lineno=v.end_lineno)
                        visit(v, f"{key}.{k.value}" if key else k.value, item)
            elif key:
                text = meaning(stmt)
                if text:
                    found[key] = text

        tree = ast.parse(source)
        is_module = inspect.ismodule(obj)
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if is_module:
                    if isinstance(target, ast.Name) and target.id == "DEFAULTS":
                        visit(node.value, prefix.rstrip("."), node)
                    continue
                key = _dotted(target)
                if key is not None:
                    visit(node.value, (prefix + key).rstrip("."), node)
            elif isinstance(node, ast.Return) and node.value is not None and not is_module:
                visit(node.value, prefix.rstrip("."), node)
    return found


def _flat(config, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in config.items():
        if hasattr(value, "items"):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def help_text(config, recipes: Mapping[str, str], comments: Mapping[str, str], *, prog: str = "ccj-train") -> str:
    """The ``--help`` page: ``config`` gives the keys and defaults, ``recipes`` name -> one line
    (the recipe files' first docstring line), ``comments`` key -> meaning (``key_comments``)."""
    lines = [
        f"usage: {prog} --config RECIPE_OR_FILE --workdir DIR [--config.KEY=VALUE ...]",
        "",
        "Trains Chinese-CLIP (contrastive, sharded over every device; multi-host with JAX's own runtime).",
        "Checkpoints, metrics.jsonl and TensorBoard events go to --workdir (local or gs://); running the",
        "same command again resumes exactly where it stopped.",
        "",
        "recipes (--config recipe:NAME; in a checkout also --config train/configs/NAME.py):",
    ]
    width = max((len(n) for n in recipes), default=0)
    lines += [f"  {name:<{width}}  {summary}".rstrip() for name, summary in recipes.items()]
    lines += ["", "config keys (--config.KEY=VALUE; default, then meaning):"]
    flat = _flat(config)
    width = min(34, max(len(k) for k, _ in flat))
    folded = {f: [k for k, _ in flat if k.startswith(f)] for f in _FOLDED}
    shown_folds = set()
    for key, value in flat:
        fold = next((f for f in _FOLDED if key.startswith(f)), None)
        if fold is not None:
            if fold not in shown_folds:
                shown_folds.add(fold)
                leaves = ", ".join(k[len(fold) :] for k in folded[fold])
                lines.append(f"  {fold}*".ljust(width + 3) + f"  {leaves}")
            continue
        entry = f"  {key:<{width}} = {value!r}"
        meaning = comments.get(key, "")
        if len(meaning) > 100:  # one line: the first sentence, or the start of it
            meaning = meaning.split(". ")[0]
            meaning = meaning if len(meaning) <= 100 else meaning[:97].rstrip() + "..."
        lines.append(f"{entry}  # {meaning}" if meaning else entry)
    lines += [
        "",
        "examples:",
        f"  {prog} --config recipe:demo --workdir build/demo",
        f"  {prog} --config recipe:finetune --workdir runs/mine \\",
        "      --config.init_from=OFA-Sys/chinese-clip-vit-base-patch16 \\",
        "      --config.data.name=files --config.data.files.table=pairs.csv --config.batch_size=64",
        "",
        "--helpfull lists every absl flag.",
    ]
    return "\n".join(lines) + "\n"
