"""`python -m lib_lora ui`: the standalone app (Gradio is imported only when it runs)."""

from pathlib import Path


def run_ui(args) -> None:
    try:
        from .app import launch_app
    except ImportError as e:
        raise SystemExit(f"the ui needs gradio: pip install -r requirements.txt ({e})") from e
    launch_app(args.checkpoint, args.out_dir, args.port, args.bind, args.api_auth, tuple(args.dataset_root or ()))


def add_ui_command(commands) -> None:
    parser = commands.add_parser("ui", help="the Train LoRA tab and a txt2img panel in the browser")
    parser.add_argument("--checkpoint", type=Path, help="base SD1 checkpoint (default: the embedded tiny model)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--out-dir", type=Path, default=Path("out"), help="LoRAs go to OUT/lora, runs to OUT/runs, presets to OUT/presets")
    parser.add_argument("--bind", default="127.0.0.1", help="address to serve on (default: this machine only)")
    parser.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]",
                        help="HTTP Basic credentials for the HTTP API under /train-lora/v1/ (as the webui's --api-auth)")
    parser.add_argument("--dataset-root", type=Path, action="append", metavar="FOLDER",
                        help="datasets may only be read from (and prepared into) this folder; repeat for several (default: any folder)")
    parser.set_defaults(run=run_ui)
