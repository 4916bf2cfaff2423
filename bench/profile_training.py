"""Where one default training run spends its time: the breakdown behind any speed-up of the fine-tuning chapters.

    python bench/profile_training.py [DATA_ROOT] [--n-train 1000] [--threads 2]

One epoch of chapter 11's default (fairbook-tiny, FairCLIP recipe, batch 32, ``n_train`` training pairs) split into
what a step and an epoch do, each timed on its own:

* reading and decoding: ``load_image`` of every training image (npz read, checks, float conversion);
* preprocessing: the training transform (PIL image, resize, crop, tensor) and tokenising the notes;
* forward/backward: optimizer steps on batches already in memory;
* evaluation: the per-epoch zero-shot scoring of the validation split (its own reading, preprocessing and
  forward passes), as :func:`fairbook.train.fit` does after every epoch.

Prints seconds per epoch and shares. The numbers describe this machine at this moment; compare before and after a
change in one sitting.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from PIL import Image
from torch.utils.data import DataLoader

from fairbook.data import FairVLMed
from fairbook.data.fairvlmed import load_image, truncate_note
from fairbook.files import atomic_write_text
from fairbook.models import create_clip
from fairbook.train import PROMPT_SETS, TrainConfig, clip_loss, set_trainable, zero_shot_scores


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_root", nargs="?", default="data/synth-fairvlmed")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the seconds per part here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = TrainConfig.preset("fairclip", epochs=1, lr=1e-4, prompts="fairmedfm")
    net, preprocess_train, preprocess_val, tokenizer = create_clip("fairbook-tiny", device="cpu")
    train = FairVLMed(args.data_root, "Training").subset(args.n_train, 0)
    val = FairVLMed(args.data_root, "Validation", preprocess_val, tokenizer)
    paths, notes = train.metadata["path"].tolist(), train.metadata["note"].tolist()

    read, images = timed(lambda: [load_image(p) for p in paths])
    preprocess, pixels = timed(lambda: torch.stack([preprocess_train(Image.fromarray(i)) for i in images]))
    tokenise, tokens = timed(lambda: torch.cat([tokenizer(truncate_note(n)) for n in notes]))

    set_trainable(net, config.trainable)
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=config.lr,
                                 betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)

    def steps():
        net.train()
        for start in range(0, len(pixels), config.batch_size):
            out = net(pixels[start:start + config.batch_size], tokens[start:start + config.batch_size])
            loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    compute, _ = timed(steps)
    loader = DataLoader(val, batch_size=config.batch_size)
    evaluation, _ = timed(lambda: zero_shot_scores(net, tokenizer, loader, PROMPT_SETS[config.prompts]))

    parts = {"reading and decoding (train)": read, "preprocessing (train images)": preprocess,
             "tokenising (train notes)": tokenise, "forward/backward (train)": compute,
             f"evaluation ({len(val)} validation images, read + forward)": evaluation}
    total = sum(parts.values())
    print(f"one epoch, {len(train)} training pairs, batch {config.batch_size}, {args.threads} threads")
    for name, seconds in parts.items():
        print(f"  {name:<55s}{seconds:8.1f} s  {seconds / total:6.1%}")
    print(f"  {'total':<55s}{total:8.1f} s")
    if args.json:
        atomic_write_text(args.json, json.dumps({"n_train": len(train), "threads": args.threads, **parts}, indent=1))


if __name__ == "__main__":
    main()
