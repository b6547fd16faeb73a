"""Caption files in bulk: remove / replace / add tags with a preview, a frequency threshold, and
captioning images with an interrogator the host offers (the webui's BLIP or deepbooru).

Tags are the comma-separated parts of a caption's first line, as kohya and the trainer read them
(`data.captions.split_tags`); they are matched case-insensitively. Files are rewritten atomically,
and only if they still hold the text the preview showed. No Gradio here.
"""

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..atomic import write_bytes_atomically
from ..data.captions import JOINER, split_tags
from ..data.errors import DatasetError
from ..data.folders import is_image_file
from ..data.images import load_image

CAPTION_MODES = ("missing only", "overwrite", "append")


@dataclass(frozen=True)
class TagEdit:
    remove: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()  # (old, new); new "" removes
    add: tuple[str, ...] = ()
    add_at_start: bool = True
    min_count: int = 0  # drop tags found in fewer images than this (rare-tag pruning); 0 = off

    @property
    def empty(self) -> bool:
        return not (self.remove or self.replace or self.add or self.min_count > 1)


@dataclass(frozen=True)
class CaptionChange:
    path: Path  # the caption file
    before: str
    after: str


def parse_tag_edit(remove: str = "", replace: str = "", add: str = "", add_at_start: bool = True, min_count: int = 0) -> TagEdit:
    """Text boxes -> a TagEdit. `replace` holds `old => new` (or `old=new`) pairs, one per line or comma-separated."""
    pairs = []
    for entry in (e.strip() for line in replace.splitlines() for e in line.split(",")):
        if not entry:
            continue
        sep = "=>" if "=>" in entry else "="
        if sep not in entry:
            raise ValueError(f"replace: {entry!r} needs the form 'old => new'")
        old, new = (part.strip() for part in entry.split(sep, 1))
        if not old:
            raise ValueError(f"replace: {entry!r} has no tag to replace")
        pairs.append((old, new))
    return TagEdit(tuple(split_tags(remove)), tuple(pairs), tuple(split_tags(add)), add_at_start, int(min_count or 0))


def caption_files(folder: Path, extension: str = ".txt") -> list[tuple[Path, Path]]:
    """(image, caption file) for every image under `folder` (recursive); the caption file may not exist yet."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    extension = extension if extension.startswith(".") else "." + extension
    return [(p, p.with_suffix(extension)) for p in sorted(folder.rglob("*")) if is_image_file(p)]


def read_first_line(path: Path) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0].strip() if lines else ""


def tag_counts(captions: Iterable[str]) -> Counter:
    """Lower-cased tag -> number of captions that have it."""
    counts = Counter()
    for caption in captions:
        counts.update({tag.lower() for tag in split_tags(caption)})
    return counts


def edit_tags(tags: list[str], edit: TagEdit, counts: Counter | None = None) -> list[str]:
    """One caption's tags after the edit: remove, replace, prune rare tags, then add (no duplicates)."""
    removed = {t.lower() for t in edit.remove}
    replacements = {old.lower(): new for old, new in edit.replace}
    added = {t.lower() for t in edit.add}
    out, seen = [], set()
    for tag in tags:
        key = tag.lower()
        if key in removed:
            continue
        if edit.min_count > 1 and counts is not None and counts[key] < edit.min_count and key not in added:
            continue
        tag = replacements.get(key, tag)
        if tag and tag.lower() not in seen:
            out.append(tag)
            seen.add(tag.lower())
    extra = [t for t in edit.add if t.lower() not in seen]
    return extra + out if edit.add_at_start else out + extra


def plan_tag_edits(folder: Path, edit: TagEdit, extension: str = ".txt") -> list[CaptionChange]:
    """The caption files the edit would change (existing files only), with their text before and after."""
    files = [caption for _, caption in caption_files(folder, extension) if caption.is_file()]
    texts = {path: path.read_text(encoding="utf-8") for path in files}
    first_lines = {path: (text.splitlines() or [""])[0] for path, text in texts.items()}
    counts = tag_counts(first_lines.values())
    changes = []
    for path, text in texts.items():
        after_first = JOINER.join(edit_tags(split_tags(first_lines[path]), edit, counts))
        rest = text.splitlines()[1:]
        after = "\n".join([after_first, *rest]) + ("\n" if text.endswith("\n") else "")
        if after != text:
            changes.append(CaptionChange(path, text, after))
    return changes


def apply_tag_edits(changes: Iterable[CaptionChange]) -> tuple[int, list[str]]:
    """Write the changes; a file edited since the preview is left alone and listed."""
    written, skipped = 0, []
    for change in changes:
        current = change.path.read_text(encoding="utf-8") if change.path.is_file() else None
        if current != change.before:
            skipped.append(f"{change.path}: changed since the preview, left alone")
            continue
        write_bytes_atomically(change.path, change.after.encode("utf-8"))
        written += 1
    return written, skipped


def preview_rows(changes: list[CaptionChange], limit: int = 20) -> list[tuple[str, str, str]]:
    """(file, before, after) first lines for a preview table."""
    return [(f"{c.path.parent.name}/{c.path.name}", (c.before.splitlines() or [""])[0], (c.after.splitlines() or [""])[0]) for c in changes[:limit]]


def caption_folder(folder: Path, captioner: Callable[[Image.Image], str], *, mode: str = "missing only", extension: str = ".txt",
                   progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Caption images with `captioner`; returns (written, skipped). Modes: CAPTION_MODES."""
    if mode not in CAPTION_MODES:
        raise ValueError(f"mode must be one of {CAPTION_MODES}, got {mode!r}")
    pairs = caption_files(folder, extension)
    written = skipped = 0
    for index, (image_path, caption_path) in enumerate(pairs):
        existing = read_first_line(caption_path)
        if mode == "missing only" and existing:
            skipped += 1
        else:
            image, _ = load_image(image_path)
            caption = captioner(image).strip()
            text = f"{existing}, {caption}" if mode == "append" and existing else caption
            write_bytes_atomically(caption_path, (text + "\n").encode("utf-8"))
            written += 1
        if progress:
            progress(index + 1, len(pairs))
    return written, skipped
