"""The dataset report: folders and repeats, image sizes, buckets, captions and tags, problems.

Built on the same scan and bucket code the trainer uses (`scan_dataset`, `make_buckets`,
`select_bucket`), so what the report says is what training will do. No Gradio here.
"""

from collections import Counter
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from ..data.buckets import make_buckets, select_bucket
from ..data.errors import DatasetError
from ..data.folders import DEFAULT_CAPTION_SOURCE, DatasetScan, is_image_file, scan_dataset

TOP_TAGS = 30
TOP_SIZES = 8

Size = tuple[int, int]


@dataclass
class SubsetRow:
    folder: str
    repeats: int
    images: int
    captioned: int  # images with a caption file
    is_reg: bool = False


@dataclass
class DatasetReport:
    root: str
    subsets: list[SubsetRow] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)  # (w, h) -> images
    buckets: dict[Size, int] = field(default_factory=dict)  # bucket -> images (train + reg, without repeats)
    upscaled: int = 0  # images smaller than their bucket (they get blurry)
    tags: list[tuple[str, int]] = field(default_factory=list)  # most frequent tags, images with each
    problems: list[str] = field(default_factory=list)  # unreadable files, loose images, ...
    warnings: list[str] = field(default_factory=list)
    error: str = ""  # the folder cannot be used at all

    @property
    def images(self) -> int:
        return sum(s.images for s in self.subsets if not s.is_reg)

    @property
    def samples(self) -> int:
        return sum(s.images * s.repeats for s in self.subsets if not s.is_reg)


def build_report(folder: str | Path, *, caption_extension: str = ".txt", resolution: Size = (512, 512), enable_bucket: bool = False,
                 min_bucket_reso: int = 256, max_bucket_reso: int = 1024, bucket_no_upscale: bool = False,
                 reg_folder: str | Path = "") -> DatasetReport:
    """Scan `folder` (and the regularization folder) and describe it; errors go into `report.error`."""
    report = DatasetReport(str(folder))
    scans = []
    for path, is_reg in ((folder, False), (reg_folder, True)):
        if not path:
            continue
        try:
            scan = scan_dataset(Path(path), caption_extension=caption_extension, allow_unreadable=True, is_reg=is_reg)
        except DatasetError as e:
            report.error = (report.error + "\n" if report.error else "") + str(e)
            continue
        scans.append(scan)
        _add_scan(report, scan, Path(path))
    if not scans:
        return report
    buckets = make_buckets(resolution, min_bucket_reso, max_bucket_reso, 64) if enable_bucket else [tuple(resolution)]
    _add_buckets(report, scans, buckets, tuple(resolution), enable_bucket, bucket_no_upscale)
    tags = Counter()
    for scan in scans:
        for counts in scan.tag_frequency().values():
            tags.update(counts)
    report.tags = tags.most_common(TOP_TAGS)
    return report


def _add_scan(report: DatasetReport, scan: DatasetScan, root: Path) -> None:
    for subset in scan.subsets:
        captioned = sum(item.caption_source != DEFAULT_CAPTION_SOURCE for item in subset.items)
        report.subsets.append(SubsetRow(subset.directory.name, subset.repeats, len(subset.items), captioned, subset.is_reg))
        report.sizes.update(item.size for item in subset.items)
    report.problems += scan.problems
    report.warnings += scan.warnings
    loose = [p.name for p in sorted(root.iterdir()) if is_image_file(p)]
    if loose:
        report.problems.append(f"{len(loose)} image(s) directly in {root} are not used (only N_name subfolders are): {', '.join(loose[:5])}")


def _add_buckets(report: DatasetReport, scans: list[DatasetScan], buckets: list[Size], resolution: Size, enable_bucket: bool, no_upscale: bool) -> None:
    counts = Counter()
    for scan in scans:
        for item in scan.items():
            if enable_bucket:
                bucket = select_bucket(item.size, buckets, no_upscale=no_upscale, resolution=resolution, step=64).bucket
            else:
                bucket = resolution
            counts[bucket] += 1
            report.upscaled += item.size[0] < bucket[0] or item.size[1] < bucket[1]
    report.buckets = dict(sorted(counts.items()))
    if report.upscaled:
        report.warnings.append(f"{report.upscaled} image(s) are smaller than their training size and will be upscaled (blurry): use larger images or a lower resolution")


def _table(head: tuple[str, ...], rows: list[tuple]) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="train-lora-table"><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>'


def _size_text(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def report_html(report: DatasetReport) -> str:
    """The report as HTML tables (escaped), for a `gr.HTML`."""
    parts = ['<div class="train-lora-report">']
    if report.error:
        parts.append(f'<div class="train-lora-error">{escape(report.error)}</div>')
    if report.subsets:
        parts.append(f"<p><b>{report.images} images</b>, {report.samples} samples per epoch with repeats</p>")
        rows = [(s.folder + (" (reg)" if s.is_reg else ""), s.repeats, s.images, s.images * s.repeats, f"{s.captioned}/{s.images}") for s in report.subsets]
        parts.append(_table(("folder", "repeats", "images", "samples", "captioned"), rows))
        sizes = report.sizes.most_common(TOP_SIZES)
        more = len(report.sizes) - len(sizes)
        parts.append("<p><b>Sizes</b>: " + escape(", ".join(f"{_size_text(s)} ({n})" for s, n in sizes) + (f", {more} more" if more > 0 else "")) + "</p>")
        parts.append("<p><b>Buckets</b>: " + escape(", ".join(f"{_size_text(b)} ({n})" for b, n in report.buckets.items())) + "</p>")
    if report.tags:
        parts.append("<p><b>Tags</b> (images with each): " + escape(", ".join(f"{t} ({n})" for t, n in report.tags)) + "</p>")
    notes = [("train-lora-error", p) for p in report.problems] + [("train-lora-warning", w) for w in report.warnings]
    if notes:
        parts.append('<ul class="train-lora-warnings">' + "".join(f'<li class="{c}">{escape(t)}</li>' for c, t in notes) + "</ul>")
    return "".join(parts) + "</div>"
