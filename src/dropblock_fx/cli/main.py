"""``dropblock-fx``: argument parsing, one-line errors (``--debug`` for the traceback)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .models import MODEL_HELP

__all__ = ["main", "build_parser"]

_EPILOG = """\
examples:
  dropblock-fx demo                              # train a small ResNet with and without DropBlock
  dropblock-fx plan resnet50 --recipe paper-resnet50
  dropblock-fx plan torchvision:resnet50 --json
  dropblock-fx recipes
  dropblock-fx validate my-recipe.yaml
  dropblock-fx masks --out masks.png
  dropblock-fx schedule paper-resnet50 --steps 1000 --out schedule.png
  dropblock-fx timm-train path/to/train.py --model resnet50_dropblock ...

run 'dropblock-fx COMMAND --help' for the options and examples of each command;
add --debug before the command to see a traceback instead of a one-line error.
"""

_COMMANDS = {
    "plan": (
        "where a recipe puts DropBlock in a model, and the real drop rates",
        """\
Print the insertion table of a model: per stage its resolution at the recipe's input size,
the sites (how many DropBlock modules of each kind), block sizes after clipping to the
feature map, the target drop rate and the expected real one (blocks overlap and are clipped,
so the real rate is below the target for large blocks). Nothing is trained or downloaded.

MODEL is """ + MODEL_HELP + ".",
        """\
examples:
  dropblock-fx plan resnet50                                   # timm, default recipe
  dropblock-fx plan resnet50 --recipe paper-resnet50 --modules # every module
  dropblock-fx plan torchvision:resnet50 --recipe timm-resnet
  dropblock-fx plan torchvision:retinanet_resnet50_fpn --recipe retinanet-coco
  dropblock-fx plan efficientnet_b0 --input-size 3 320 320 --set block_size=5
  dropblock-fx plan resnet50 --recipe paper-resnet50 --png plan.png  # the plan as a picture
  dropblock-fx plan mypkg.models:SmallNet --recipe my-recipe.yaml --json
""",
    ),
    "recipes": (
        "list the built-in recipes (or print one as YAML)",
        "List the built-in recipes, one line each; with NAME, print that recipe's YAML "
        "(a starting point for your own: save it, edit it, 'dropblock-fx validate' it).",
        """\
examples:
  dropblock-fx recipes
  dropblock-fx recipes paper-resnet50 > my-recipe.yaml
  dropblock-fx recipes --json
""",
    ),
    "validate": (
        "check recipe files; errors name the line and key path",
        "Check recipe YAML files. Every problem is printed as FILE:LINE: KEY.PATH: reason (got "
        "value); allowed: ...  With --model, the recipe's stages are also checked against the "
        "model's. Exit status 1 if any file is invalid.",
        """\
examples:
  dropblock-fx validate my-recipe.yaml
  dropblock-fx validate recipes/*.yaml
  dropblock-fx validate my-recipe.yaml --model torchvision:resnet50
""",
    ),
    "masks": (
        "PNG of what dropout, SpatialDropout and DropBlock drop",
        """\
Write a PNG: an input image (yours, or a built-in sample photo) and what dropout,
SpatialDropout and DropBlock at several block sizes drop from a feature map of it, at the
same drop rate (the figure people use to explain DropBlock). Each row is one channel:
DropBlock draws a mask per channel (the paper's choice).""",
        """\
examples:
  dropblock-fx masks                               # built-in sample, writes dropblock_masks.png
  dropblock-fx masks --image cat.jpg --out cat_masks.png --drop-prob 0.2
  dropblock-fx masks --block-sizes 3 5 7 9 --size 28 --seed 1
""",
    ),
    "schedule": (
        "print and plot the drop rate of each stage over training",
        """\
Print, and plot as a PNG, the drop rate of each stage of a recipe over N optimizer steps,
as attach_schedule drives it (the recipe's schedule times each stage's multiplier). With
--model, stage references are resolved against the model (names, negative indices).""",
        """\
examples:
  dropblock-fx schedule paper-resnet50 --steps 1000        # also writes dropblock_schedule.png
  dropblock-fx schedule my-recipe.yaml --steps 20000 --out schedule.png
  dropblock-fx schedule last-two-stages --steps 500 --model resnet50 --no-plot
""",
    ),
    "demo": (
        "why DropBlock and not dropout: the mechanism, then training with each (no download)",
        """\
Two measurements on a small timm ResNet and a small real data set that needs no download
(scikit-learn's handwritten digits, 8x8 scans upscaled to 64 px; or --data, an ImageFolder):

1. the mechanism: on the network trained without a regularizer, drop the same fraction p
   (0.05 to 0.3) of one stage's feature map with dropout and with DropBlock (blocks 3 and 5),
   and measure how much the next stage's output and the logits change (spread over batches);
2. training, long enough to overfit, in three arms: no regularizer, DropBlock (the recipe;
   by default last-two-stages moved to stages 2-3, whose 8x8 and 4x4 maps a 3x3 block fits),
   and dropout at the same sites, rates and schedule (the recipe with block_size 1). Each arm
   runs once per seed; a seed fixes the initial weights and the batch order of every arm.

Prints both as tables and plots them (every epoch, the drop-rate schedule). The outcome is
what was measured. The runs go to worker processes, one torch thread each (--jobs).
--quick is a smoke test of a few seconds.""",
        """\
examples:
  dropblock-fx demo
  dropblock-fx demo --seeds 5 --epochs 30 --out demo.png
  dropblock-fx demo --train-per-class 0                    # all the training images
  dropblock-fx demo --recipe paper-resnet50 --set stages=[2,3] --set block_size=3
  dropblock-fx demo --data ~/data/flowers --image-size 96   # ImageFolder: one folder per class
  dropblock-fx demo --quick
""",
    ),
    "timm-train": (
        "run timm's train.py with DropBlock models and the recipe's schedule",
        """\
Run a copy of timm's train.py (its arguments after SCRIPT) with this library's timm models
registered: --model resnet50_dropblock (any <arch>_dropblock), --model-kwargs
recipe=paper-resnet50 for another recipe. The recipe's DropBlock schedule follows the run: its
length is the run's epochs times updates per epoch, each optimizer step advances it, and
--resume continues it from the checkpoint's epoch. Works under torchrun.""",
        """\
examples:
  dropblock-fx timm-train train.py --data-dir /data/imagenet --model resnet50_dropblock --epochs 90
  dropblock-fx timm-train train.py --model resnet50_dropblock --model-kwargs recipe=paper-resnet50
  torchrun --nproc_per_node=8 -m dropblock_fx.cli timm-train train.py ...
""",
    ),
}


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _recipe_args(p: argparse.ArgumentParser, default_help: str = "default: last-two-stages") -> None:
    p.add_argument("--recipe", "-r", metavar="R", default=None,
                   help=f"a built-in recipe name or a YAML file ({default_help})")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a recipe field (YAML value), e.g. --set block_size=5 --set 'stages=[3, 4]'")


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="dropblock-fx",
        description="Paper-faithful DropBlock for the CNNs you already use: plan, inspect and try it.",
        epilog=_EPILOG,
        formatter_class=_formatter,
    )
    parser.add_argument("-V", "--version", action="version", version=f"dropblock-fx {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        short, desc, examples = _COMMANDS[name]
        p = sub.add_parser(name, help=short, description=desc, epilog=examples, formatter_class=_formatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
        return p

    p = command("plan")
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    _recipe_args(p)
    p.add_argument("--input-size", metavar="N", nargs="+", default=None,
                   help="input size: 224, 224 224, 3 224 224 or 3x224x224 (default: the recipe's)")
    p.add_argument("--target", metavar="PATH", default=None,
                   help="apply to this submodule (e.g. backbone.body; default: the recipe's)")
    p.add_argument("--modules", "-m", action="store_true", help="also list every DropBlock module")
    p.add_argument("--verify", action="store_true",
                   help="also apply it and check the eval outputs are bit-identical on a random input")
    p.add_argument("--example-inputs", metavar="LITERAL", nargs="+", default=None,
                   help="what the model's forward takes, when not one image: one Python literal per positional "
                        "argument, a tuple of ints being a tensor shape without the batch, e.g. "
                        "\"[(3, 8, 224, 224), (3, 32, 224, 224)]\" for SlowFast's list of two clips")
    p.add_argument("--explain", action="store_true",
                   help="also list the positions left out for holding no feature map (a gate, attention logits, "
                        "unfolded patches, windows), and why")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="also draw the plan: the stages (feature map, channels) and their DropBlock "
                        "modules with their rates (needs matplotlib: the demo extra)")

    p = command("recipes")
    p.add_argument("name", metavar="NAME", nargs="?", help="print this recipe as YAML")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = command("validate")
    p.add_argument("files", metavar="FILE", nargs="+", help="recipe YAML files (or built-in names)")
    p.add_argument("--model", metavar="MODEL", default=None, help="also check the stages against " + MODEL_HELP)

    p = command("masks")
    p.add_argument("--image", metavar="PATH", default=None, help="your image (default: a built-in sample photo)")
    p.add_argument("--out", "-o", metavar="PNG", default="dropblock_masks.png", help="output file")
    p.add_argument("--drop-prob", type=float, default=0.15, help="drop rate of every method (default 0.15)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[3, 5, 7], metavar="K",
                   help="DropBlock block sizes (default 3 5 7)")
    p.add_argument("--size", type=int, default=28, help="feature map side (default 28, ResNet stage 2 at 224 px)")
    p.add_argument("--channels", type=int, default=3, help="channels (rows) shown (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")

    p = command("schedule")
    p.add_argument("recipe", metavar="RECIPE", help="a built-in recipe name or a YAML file")
    p.add_argument("--steps", type=int, required=True, metavar="N", help="optimizer steps of the whole run")
    p.add_argument("--steps-per-epoch", type=int, default=None, metavar="N",
                   help="needed when the schedule's length is given in epochs")
    p.add_argument("--model", metavar="MODEL", default=None, help="resolve stages against " + MODEL_HELP)
    p.add_argument("--points", type=int, default=11, help="rows printed (default 11)")
    p.add_argument("--out", "-o", metavar="PNG", default=None,
                   help="plot file (default: dropblock_schedule.png, none with --json)")
    p.add_argument("--no-plot", action="store_true", help="print only")
    p.add_argument("--json", action="store_true", help="machine-readable output (no plot unless --out is given)")

    p = command("demo")
    _recipe_args(p, "default: last-two-stages on stages 2-3 with block_size 3, for the demo's 64 px images")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="an ImageFolder (DIR/CLASS/*.png); default: scikit-learn's digits")
    p.add_argument("--model", metavar="NAME", default="resnet10t", help="a timm ResNet (default resnet10t)")
    p.add_argument("--width", type=int, default=16,
                   help="channels of the first stage, doubled per stage (default 16; 0 = timm's own)")
    p.add_argument("--epochs", type=int, default=24, help="epochs per run (default 24)")
    p.add_argument("--train-per-class", type=int, default=15, metavar="N",
                   help="training images per class, a small subset so the model overfits (default 15; 0 = all)")
    p.add_argument("--seeds", type=int, default=3, help="runs per arm, seeds SEED, SEED+1, ... (default 3)")
    p.add_argument("--no-dropout-arm", action="store_true",
                   help="skip the third arm (dropout: the recipe with block_size 1)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--image-size", type=int, default=64, help="images are resized to this (default 64)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="first seed; also picks the data split (default 0)")
    p.add_argument("--probe-stage", type=int, default=None, metavar="N",
                   help="the stage whose map the mechanism drops (default: the recipe's shallowest stage)")
    p.add_argument("--jobs", "-j", type=int, default=0, metavar="N",
                   help="worker processes for the runs (default 0: one per CPU core, at most 4; 1: in this "
                        "process)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per run (default 1: the demo's small convolutions gain little from "
                        "more, and lose much when other jobs share the cores; 0 = torch's default)")
    p.add_argument("--out", "-o", metavar="PNG", default="dropblock_demo.png", help="plot file")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--no-progress", action="store_true", help="no line per finished run")
    p.add_argument("--quick", action="store_true",
                   help="a seconds-long smoke test: 1 epoch on a few batches, tiny model, one process")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")

    p = command("timm-train")
    p.add_argument("script", metavar="SCRIPT", help="your copy of timm's train.py")
    p.add_argument("args", metavar="...", nargs=argparse.REMAINDER, help="train.py's own arguments")
    return parser


def _one_line(e: BaseException) -> str:
    from ..recipe import RecipeError

    if isinstance(e, RecipeError):
        first = str(e).splitlines()[0]
        more = len(e.issues) - 1
        return first + (f" (and {more} more; see 'dropblock-fx validate')" if more > 0 else "")
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)) and getattr(e, "filename", None):
        text = f"{e.strerror}: {e.filename}"
    if isinstance(e, ModuleNotFoundError) and e.name in ("matplotlib", "sklearn", "PIL") \
            and "pip install" not in text:
        text += ' (the demo and plots need the demo extra; in a clone of dropblock-fx: pip install -e ".[demo]")'
    return text if len(text) <= 400 else text[:397] + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``dropblock-fx``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from . import commands

    run = getattr(commands, "cmd_" + args.command.replace("-", "_"))
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("dropblock-fx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dropblock-fx plan ... | head`
        return 0
    except Exception as e:  # noqa: BLE001 - one line for users, the traceback with --debug
        if getattr(args, "debug", False):
            raise
        print(f"dropblock-fx {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
