"""How many torchvision (and a few timm) classifiers :class:`ChannelPruner` prunes cleanly.

For every torchvision classification model (random init, 10 classes, a small input) and a short list of
timm models: prune 50% of the channels with the L1 metric, then check the pruned model runs, keeps the
output shape and really lost parameters (the unit tests check, on BatchNorm nets, that the pruned model
computes exactly what the original computes with the removed channels zeroed). The anchor, Torch-Pruning,
reports 81 of 85 torchvision models.

    keel bench prune_coverage                  # all of them (a few minutes on 2 cores)
    keel bench prune_coverage --only resnet18 densenet121
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_json  # noqa: E402

from core.compression.pruning.channel import ChannelPruner  # noqa: E402

TIMM_MODELS = (
    "efficientnet_lite0",
    "mobilenetv3_large_100",
    "convnext_atto",
    "regnety_002",
    "resnext26ts",
    "ghostnet_100",
)
INPUT_SIZE = {"inception_v3": 96, "vit_h_14": 56, "maxvit_t": 224}


def build(name: str) -> nn.Module:
    if name.startswith("timm:"):
        import timm

        return timm.create_model(name[5:], pretrained=False, num_classes=10)
    import torchvision

    kwargs: dict[str, object] = (
        {"aux_logits": False, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    )
    if name.startswith("vit_"):
        kwargs["image_size"] = INPUT_SIZE.get(name, 64)
    return torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)


def try_one(name: str) -> dict[str, object]:
    torch.manual_seed(0)
    start = time.perf_counter()
    size = INPUT_SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size)
    row: dict[str, object] = {"model": name, "input": size}
    try:
        model = build(name).eval()
        before = sum(p.numel() for p in model.parameters())
        row["params_M"] = before / 1e6
        pruner = ChannelPruner(model, 0.5, "l1", example_input=x)
        pruned = pruner.prune()
        after = sum(p.numel() for p in pruned.parameters())
        with torch.no_grad():
            out = pruned(x)
        ok = out.shape == model(x).shape and after < before
        row.update(status="ok" if ok else "no-op", pruned_params_M=after / 1e6, kept=after / before)
    except Exception as err:  # one failing architecture must not stop the survey
        row.update(status="fail", error=f"{type(err).__name__}: {str(err)[:200]}")
        traceback.print_exc(limit=2)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main() -> None:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model names (timm ones as timm:NAME)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or [
        *torchvision.models.list_models(module=torchvision.models),
        *(f"timm:{n}" for n in TIMM_MODELS),
    ]
    rows = []
    for name in names:
        row = try_one(name)
        print(f"{row['model']:28s} {row['status']:6s} {row.get('kept', '')!s:.5s} {row.get('error', '')}", flush=True)
        rows.append(row)
    tv = [r for r in rows if not str(r["model"]).startswith("timm:")]
    summary = {
        "torchvision_tried": len(tv),
        "torchvision_pruned": sum(r["status"] == "ok" for r in tv),
        "timm_tried": len(rows) - len(tv),
        "timm_pruned": sum(r["status"] == "ok" for r in rows if r not in tv),
    }
    print_table(
        "Channel pruning coverage (50%, L1, random init)",
        [{k: r.get(k, "") for k in ("model", "status", "params_M", "kept", "seconds")} for r in rows],
    )
    print(summary)
    if not args.only:
        write_json("prune_coverage", {"command": "keel bench prune_coverage", "summary": summary, "models": rows})


if __name__ == "__main__":
    main()
