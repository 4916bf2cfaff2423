"""Learnability benchmark: does the tiny default CLIP image encoder learn glaucoma on SynthFairVLMed?

    python bench/learnability.py DATA_DIR [--epochs N] [--json OUT]

Trains the randomly initialised image tower of ``fairbook-tiny`` plus a linear head with binary cross-entropy
on the Training split (AdamW, linear warm-up then cosine decay), picks the epoch with the best Validation AUC
and reports its Test AUC. Beside it: logistic regression on raw downsampled pixels (a sanity ceiling for a
linear read-out) and, when the npz files carry ``disc_mask``/``cup_mask`` (synthetic data), the AUC of the
vertical cup-to-disc ratio measured on the masks (the anatomical signal the images were rendered from).

Images go through the real pipeline, the project loader ``fairbook.data.FairVLMed``: float32 array -> PIL
mode "F" -> CLIP preprocess_val (resize the shorter side, centre crop, 3 channels, CLIP mean/std), once, into
one in-memory tensor. Validation and Test use the official filter (samples with an unknown race, gender,
ethnicity or language dropped), as every notebook does by default.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fairbook.data import SPLITS, FairVLMed
from fairbook.data.summary import vertical_cdr
from fairbook.models import ImageClassifier, create_clip


def load_split(root: Path, split: str, preprocess, limit: int | None = None) -> dict:
    """Preprocessed images (N x 3 x S x S float32), labels and mask-based vertical CDR of one split.

    Items come from the project loader :class:`fairbook.data.FairVLMed` with the official filter (unknown
    race/gender/ethnicity/language dropped from Validation and Test only); ``limit`` keeps the first N samples.
    """
    dataset = FairVLMed(root, split, preprocess=preprocess)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    images = torch.stack([dataset[i]["image"] for i in range(n)])
    cdrs = []
    for path in dataset.metadata["path"][:n]:
        with np.load(path) as d:
            cdrs.append(vertical_cdr(d["disc_mask"], d["cup_mask"]) if "cup_mask" in d.files else np.nan)
    labels = torch.tensor(dataset.metadata["glaucoma"].to_numpy()[:n], dtype=torch.float32)
    return {"x": images, "y": labels, "cdr": np.array(cdrs)}


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def train_encoder(data: dict, epochs: int, batch_size: int, lr: float, warmup: float, seed: int) -> dict:
    """Train image tower + linear head with BCE; return per-epoch Validation AUC and the selected Test AUC."""
    torch.manual_seed(seed)
    clip, *_ = create_clip("fairbook-tiny", device="cpu")
    model = ImageClassifier(clip.visual)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}], lr=lr)
    x, y = data["Training"]["x"], data["Training"]["y"]
    steps_per_epoch = math.ceil(len(x) / batch_size)
    total, warm = epochs * steps_per_epoch, max(1, int(warmup * steps_per_epoch))

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 0
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    history, best = [], (-1.0, None)
    for epoch in range(epochs):
        model.train()
        t0, losses = time.time(), []
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_auc = roc_auc_score(data["Validation"]["y"], predict(model, data["Validation"]["x"]))
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_auc": float(val_auc),
                        "seconds": time.time() - t0})
        print(f"  epoch {epoch + 1}: train loss {np.mean(losses):.4f}  val AUC {val_auc:.4f}  "
              f"({time.time() - t0:.0f} s)", flush=True)
        if val_auc > best[0]:
            best = (val_auc, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    test_auc = roc_auc_score(data["Test"]["y"], predict(model, data["Test"]["x"]))
    chosen = max(history, key=lambda h: h["val_auc"])["epoch"]
    n_params = sum(p.numel() for p in model.parameters())
    return {"test_auc": float(test_auc), "best_epoch": chosen, "history": history, "parameters": n_params}


def pixel_features(x: torch.Tensor, size: int) -> np.ndarray:
    """First channel of the preprocessed images, area-downsampled to size x size, flattened."""
    return torch.nn.functional.adaptive_avg_pool2d(x[:, :1], size).flatten(1).numpy()


def pixel_logistic(data: dict, size: int, seed: int) -> dict:
    """Logistic regression on downsampled pixels; C picked on Validation AUC from a small grid."""
    feats = {s: pixel_features(data[s]["x"], size) for s in SPLITS}
    mean, std = feats["Training"].mean(0), feats["Training"].std(0) + 1e-6
    feats = {s: (f - mean) / std for s, f in feats.items()}
    best = (-1.0, None, None)
    for c in (1e-4, 1e-3, 1e-2):
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(feats["Training"], data["Training"]["y"])
        val_auc = roc_auc_score(data["Validation"]["y"], clf.decision_function(feats["Validation"]))
        if val_auc > best[0]:
            best = (val_auc, c, clf)
    test_auc = roc_auc_score(data["Test"]["y"], best[2].decision_function(feats["Test"]))
    return {"test_auc": float(test_auc), "val_auc": float(best[0]), "C": best[1], "pixels": f"{size}x{size}"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up length in epochs")
    parser.add_argument("--pixels", type=int, default=32, help="side of the downsampled image for the pixel baseline")
    parser.add_argument("--max-train", type=int, help="use only the first N Training samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    start = time.time()
    _, _, preprocess, _ = create_clip("fairbook-tiny", device="cpu")
    data = {s: load_split(args.data_dir, s, preprocess, args.max_train if s == "Training" else None) for s in SPLITS}
    load_s = time.time() - start
    sizes = {s: len(data[s]["y"]) for s in SPLITS}
    print(f"loaded {sizes} in {load_s:.0f} s; input {tuple(data['Training']['x'].shape[1:])}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    t0 = time.time()
    oracle = data["Test"]["cdr"]
    oracle_auc = float(roc_auc_score(data["Test"]["y"], oracle)) if np.isfinite(oracle).all() else None
    pixels = pixel_logistic(data, args.pixels, args.seed)
    pixels["seconds"] = time.time() - t0
    print(f"pixel logistic regression ({pixels['pixels']}, C={pixels['C']}): test AUC {pixels['test_auc']:.4f} "
          f"({pixels['seconds']:.0f} s)", flush=True)
    if oracle_auc is not None:
        print(f"mask vertical CDR (anatomical signal): test AUC {oracle_auc:.4f}", flush=True)

    t0 = time.time()
    print(f"tiny CLIP image encoder + linear head: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"warm-up {args.warmup} epoch", flush=True)
    encoder = train_encoder(data, args.epochs, args.batch_size, args.lr, args.warmup, args.seed)
    encoder["seconds"] = time.time() - t0
    print(f"tiny encoder: test AUC {encoder['test_auc']:.4f} (epoch {encoder['best_epoch']} chosen on validation; "
          f"{encoder['parameters'] / 1e6:.2f} M parameters; {encoder['seconds']:.0f} s)", flush=True)

    result = {"data_dir": str(args.data_dir), "sizes": sizes, "settings": {k: v for k, v in vars(args).items()
              if k not in ("data_dir", "json")}, "torch_threads": torch.get_num_threads(), "load_seconds": load_s,
              "pixel_logistic": pixels, "mask_cdr_test_auc": oracle_auc, "tiny_encoder": encoder,
              "total_seconds": time.time() - start}
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
