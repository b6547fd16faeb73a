"""`inspect`: what a LoRA file holds, read like a loader reads it (kohya, LyCORIS or diffusers/PEFT keys).

Modules by component (unet / te / te1 / te2), algorithm (lora, locon = a LoRA on a k×k conv or with
a Tucker core, loha, lokr), rank and alpha histograms, stored dtypes, base architecture (metadata,
else module names and shapes), trigger words (`modelspec.trigger_phrase`, the most frequent caption
tags), kohya's training options (`ss_*`) and hashes (`sshs_*`, checked against the file's data).
"""

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..networks.base import AdapterModule
from .lowrank import is_kxk, module_in_shape
from .sources import is_dora, load_source, tag_counts

# Dataset JSON: summed into the top tags, not listed among the training options.
JSON_FIELDS = ("ss_tag_frequency", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_bucket_info", "ss_datasets")
TOP_TAGS = 10


@dataclass
class LoraReport:
    path: Path
    file_size: int
    key_format: str
    dtypes: dict[str, int]
    components: dict[str, int]
    algorithms: dict[str, int]
    ranks: dict[int | None, int]
    alphas: dict[float | None, int]
    architecture: str | None
    architecture_source: str
    v_parameterization: bool
    trigger_phrase: str | None
    top_tags: list[tuple[str, int]]
    training: dict[str, str]
    hashes: dict[str, str]
    data_hash: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def module_count(self) -> int:
        return sum(self.components.values())

    def to_json(self) -> dict:
        report = asdict(self)
        report["path"] = str(self.path)
        for key in ("ranks", "alphas"):
            report[key] = {str(k): v for k, v in report[key].items()}
        return report


def component_of(name: str) -> str:
    """unet / te / te1 / te2 from the kohya prefix `lora_<component>_`."""
    return name.split("_")[1]


def algorithm_of(module: AdapterModule) -> str:
    """lora, locon (a LoRA on a k×k conv, or LyCORIS's Tucker LoCon), loha or lokr; `+dora` with a DoRA magnitude."""
    locon = module.algo == "lora" and (getattr(module, "lora_mid", None) is not None or is_kxk(module_in_shape(module)))
    return ("locon" if locon else module.algo) + ("+dora" if is_dora(module) else "")


def _sorted_counts(values) -> dict:
    counts = Counter(values)
    return dict(sorted(counts.items(), key=lambda item: (item[0] is None, item[0] or 0)))


def inspect_lora(path) -> LoraReport:
    """Read and validate `path` and describe it; a file that does not load raises LoraFormatError naming the key."""
    source = load_source(path)
    lora, meta = source.lora, source.lora.metadata
    tags, problems = tag_counts(meta)
    hashes = {k: v for k, v in meta.items() if k.startswith("sshs_")}
    if source.data_hash and "sshs_model_hash" in hashes and hashes["sshs_model_hash"] != source.data_hash:
        problems.append("sshs_model_hash does not match the file's tensor data (tensors changed after it was computed)")
    return LoraReport(
        path=source.path,
        file_size=source.path.stat().st_size,
        key_format=source.key_format,
        dtypes=source.dtype_counts,
        components=dict(Counter(component_of(name) for name in lora.modules)),
        algorithms=dict(Counter(algorithm_of(m) for m in lora.modules.values())),
        ranks=_sorted_counts(m.rank for m in lora.modules.values()),
        alphas=_sorted_counts(m.alpha_value for m in lora.modules.values()),
        architecture=source.architecture.arch,
        architecture_source=source.architecture.source,
        v_parameterization=source.architecture.v_parameterization,
        trigger_phrase=meta.get("modelspec.trigger_phrase"),
        top_tags=tags.most_common(TOP_TAGS),
        training={k: v for k, v in sorted(meta.items()) if k.startswith("ss_") and k not in JSON_FIELDS},
        hashes=hashes,
        data_hash=source.data_hash,
        problems=problems,
    )


def _histogram(counts: dict) -> str:
    return ", ".join(f"{'none' if k is None else f'{k:g}'} x{n}" for k, n in counts.items())


def format_report(report: LoraReport, max_value: int = 120) -> str:
    """The report as the CLI prints it; long option values are cut at `max_value` characters."""
    parts = ", ".join(f"{k} {n}" for k, n in sorted(report.components.items()))
    lines = [
        f"file: {report.path} ({report.file_size / 1e6:.2f} MB, {report.key_format} keys)",
        f"architecture: {report.architecture or 'unknown'} (from {report.architecture_source})"
        + (", v-prediction" if report.v_parameterization else ""),
        f"modules: {report.module_count} ({parts})",
        f"algorithms: {', '.join(f'{k} {n}' for k, n in sorted(report.algorithms.items()))}",
        f"ranks: {_histogram(report.ranks)}",
        f"alphas: {_histogram(report.alphas)}",
        f"dtypes: {', '.join(f'{k} x{n}' for k, n in report.dtypes.items())}",
        f"trigger phrase: {report.trigger_phrase or '-'}",
        f"top tags: {', '.join(f'{t} ({n})' for t, n in report.top_tags) or '-'}",
    ]
    if report.training:
        lines.append("training options:")
        lines += [f"  {k} = {v if len(v) <= max_value else v[:max_value] + '...'}" for k, v in report.training.items()]
    lines.append("hashes:")
    lines += [f"  {k} = {v}" for k, v in report.hashes.items()]
    lines.append(f"  tensor data sha256 = {report.data_hash or '-'}")
    lines += [f"problem: {p}" for p in report.problems]
    return "\n".join(lines)
