"""Model references of the form `zoo:<zoo>/<member>` that name models of a built zoo.

Recipes in `configs/` use them so that they run as they are once the zoo is built:
`zoo:text/base` is the text zoo's base encoder and `zoo:text/wn-noun` the encoder
fine-tuned on the `wn-noun` task (`zoo:text-small/...` for the small zoo). Any other
string is an ordinary path (`~` expanded).
"""

from __future__ import annotations

from pathlib import Path

from mergekit_ext.errors import CheckpointError

PREFIX = "zoo:"


def resolve_model_reference(reference: str | Path) -> Path:
    """Return the folder a model reference names; plain paths pass through."""
    text = str(reference)
    if not text.startswith(PREFIX):
        return Path(text).expanduser()

    zoo_name, _, member = text[len(PREFIX):].partition("/")
    if zoo_name not in ("text", "text-small") or not member:
        raise CheckpointError(
            f"invalid zoo reference {text!r}; use zoo:text/<task> or zoo:text/base "
            "(zoo:text-small/... for the small zoo)"
        )
    from mergekit_ext.zoo.text import default_zoo_dir

    small = zoo_name == "text-small"
    zoo_dir = default_zoo_dir(small=small)
    folder = zoo_dir / "base" if member == "base" else zoo_dir / "tasks" / member / "model"
    if not folder.is_dir():
        build = "merge zoo build text" + (" --small" if small else "")
        raise CheckpointError(f"{text}: {folder} does not exist; build the zoo first with `{build}`")
    return folder


def display_name(folder: Path) -> str:
    """Return the name a model card uses for a checkpoint folder (never a full path)."""
    if folder.name == "model" and folder.parent.name:
        return folder.parent.name
    return folder.name
