"""`python -m lib_lora inspect | blend | resize | extract | bake`: the toolbox's subcommands.

Flags are converted to plain arguments here; errors (ValueErrors naming the file or field) are
printed by `__main__.main`.
"""

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from ..networks.files import SAVE_DTYPES
from .common import ToolResult, parse_weighted
from .lowrank import RankRule

WORST_SHOWN = 5


def _progress(items, description):
    return tqdm(items, desc=description, unit="module", leave=False)


def print_result(result: ToolResult, verbose: bool) -> None:
    """A summary line, then every module (verbose) or the ones with the largest error."""
    print(f"wrote {result.path}: {result.summary()}")
    shown = result.modules if verbose else sorted(result.modules, key=lambda m: -m.error)[:WORST_SHOWN]
    for m in shown:
        print(f"  {m.name}: rank {m.source_rank if m.source_rank is not None else '-'} -> {m.rank}, error {m.error:.3g}")
    for name, why in result.skipped.items() if verbose else ():
        print(f"  {name}: skipped, {why}")


def _dtype(args):
    return SAVE_DTYPES[args.precision] if args.precision else None


def _inspect(args) -> None:
    from .inspect_lora import format_report, inspect_lora

    for path in args.files:
        report = inspect_lora(path)
        print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))


def _rule(args, required: bool) -> RankRule | None:
    given = {name: getattr(args, name, None) for name in ("rank", "conv_rank", "fro", "energy", "ratio")}
    if all(value is None for value in given.values()) and not required:
        return None
    return RankRule(**given)


def _blend(args) -> None:
    from .blend import blend_loras

    inputs = [parse_weighted(spec) for spec in args.inputs]
    print_result(blend_loras(inputs, args.out, _rule(args, required=False), dtype=_dtype(args), overwrite=args.overwrite,
                             progress=_progress), args.verbose)


def _resize(args) -> None:
    from .resize import resize_lora

    print_result(resize_lora(args.file, args.out, _rule(args, required=True), dtype=_dtype(args), overwrite=args.overwrite,
                             progress=_progress), args.verbose)


def _extract(args) -> None:
    from .extract import extract_lora

    dtype = _dtype(args) or SAVE_DTYPES["fp16"]
    result = extract_lora(args.base, args.tuned, args.out, args.rank, args.conv_rank, args.min_diff, dtype=dtype,
                          device=args.device, overwrite=args.overwrite, progress=_progress)
    print_result(result, args.verbose)


def _bake(args) -> None:
    from .bake import bake_loras

    loras = [parse_weighted(spec) for spec in args.loras]
    print(f"wrote {bake_loras(args.base, loras, args.out, fp16=args.fp16, overwrite=args.overwrite)}")


def _output_flags(parser: argparse.ArgumentParser, precision_help: str) -> None:
    parser.add_argument("-o", "--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    parser.add_argument("--precision", choices=sorted(SAVE_DTYPES), help=precision_help)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every module's rank and error")


def _rank_flags(parser: argparse.ArgumentParser, rank_help: str) -> None:
    parser.add_argument("--rank", type=int, help=rank_help)
    parser.add_argument("--conv-rank", type=int, help="rank of 3x3 conv (LoCon) modules (default: --rank)")


def add_tools_commands(commands) -> None:
    inspect = commands.add_parser("inspect", help="what a LoRA file holds: modules, ranks, architecture, tags, options, hashes")
    inspect.add_argument("files", type=Path, nargs="+")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=_inspect)

    blend = commands.add_parser("blend", help="one LoRA equal to applying several with weights (exact, or SVD to --rank)")
    blend.add_argument("inputs", nargs="+", metavar="FILE[:WEIGHT]", help="LoRA files, each with its weight (default 1)")
    _rank_flags(blend, "cut each module to this rank by SVD (default: exact, ranks concatenated)")
    _output_flags(blend, "tensor dtype of OUT (default: the first input's)")
    blend.set_defaults(run=_blend)

    resize = commands.add_parser("resize", help="lower a LoRA's rank by SVD (kohya resize_lora: fixed, sv_fro, sv_cumulative)")
    resize.add_argument("file", type=Path)
    _rank_flags(resize, "new rank; with --fro/--energy/--ratio, the largest rank kept")
    rules = resize.add_mutually_exclusive_group()
    rules.add_argument("--fro", type=float, help="keep this fraction of each module's Frobenius norm (kohya sv_fro)")
    rules.add_argument("--energy", type=float, help="keep this fraction of the sum of singular values (kohya sv_cumulative)")
    rules.add_argument("--ratio", type=float, help="keep singular values above the largest / RATIO (kohya sv_ratio)")
    _output_flags(resize, "tensor dtype of OUT (default: the source's)")
    resize.set_defaults(run=_resize)

    extract = commands.add_parser("extract", help="a LoRA approximating TUNED - BASE (two checkpoints of one architecture)")
    extract.add_argument("base", type=Path)
    extract.add_argument("tuned", type=Path)
    extract.add_argument("--rank", type=int, required=True, help="rank of Linear and 1x1 modules")
    extract.add_argument("--conv-rank", type=int, help="also extract 3x3 convs (LoCon) at this rank")
    extract.add_argument("--min-diff", type=float, default=0.01, help="skip layers whose largest difference is at most this")
    extract.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda)")
    _output_flags(extract, "tensor dtype of OUT (default: fp16)")
    extract.set_defaults(run=_extract)

    bake = commands.add_parser("bake", help="merge LoRAs into a checkpoint, saved as a new .safetensors")
    bake.add_argument("base", type=Path)
    bake.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]")
    bake.add_argument("-o", "--out", type=Path, required=True, help="the new checkpoint (never BASE)")
    bake.add_argument("--fp16", action="store_true", help="save in fp16 (default: BASE's dtype)")
    bake.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never BASE)")
    bake.set_defaults(run=_bake)
