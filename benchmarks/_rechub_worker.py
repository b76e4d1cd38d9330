"""torch-rechub's ESMM, trained by its own ``MTLTrainer`` on its own ``DataGenerator`` loaders,
for ``throughput.py``. Runs in the torch-rechub virtual environment (no mtrank import).

Usage: ``python _rechub_worker.py ARGS_JSON OUT_JSON``. Reads the encoded ids exported by
``throughput.py`` (``npz``: ``train_x`` / ``test_x`` int64 ``[N, n_fields]``, click and
conversion labels, ``cardinalities``, ``fields``), trains one epoch, times it, and writes the
test predictions (columns in rechub's order: cvr, ctr, ctcvr) next to the result. ``device``
in ARGS_JSON (default ``cpu``) is passed to its trainer (``gpu_throughput.py`` uses ``cuda``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch_rechub.basic.features import SparseFeature
from torch_rechub.models.multi_task import ESMM
from torch_rechub.trainers import MTLTrainer
from torch_rechub.utils.data import DataGenerator

USER_FIELDS = {"user_id", "user_age", "user_gender", "user_power", "hour"}


def main() -> None:
    a = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    torch.set_num_threads(a["threads"])
    torch.manual_seed(a.get("seed", 0))
    z = np.load(a["npz"])
    fields = [str(f) for f in z["fields"]]
    pad = a.get("pad") or {}  # allocate a field's whole declared catalogue
    card = [max(int(c), pad.get(f, 0)) for f, c in zip(fields, z["cardinalities"], strict=True)]
    feats = {
        f: SparseFeature(f, vocab_size=c, embed_dim=a["emb"])
        for f, c in zip(fields, card, strict=True)
    }
    user = [feats[f] for f in fields if f in USER_FIELDS]
    item = [feats[f] for f in fields if f not in USER_FIELDS]

    def xy(split: str):
        x = {f: z[f"{split}_x"][:, j] for j, f in enumerate(fields)}
        click, conv = z[f"{split}_click"], z[f"{split}_conv"]
        return x, np.stack([conv, click, click * conv], axis=1).astype(
            np.float32
        )  # rechub's ESMM order: cvr, ctr, ctcvr

    x_tr, y_tr = xy("train")
    if a.get("max_rows"):
        x_tr, y_tr = {k: v[: a["max_rows"]] for k, v in x_tr.items()}, y_tr[: a["max_rows"]]
    x_te, y_te = xy("test")
    tower = {"dims": a["tower"], "dropout": 0.0, "activation": "relu"}
    model = ESMM(user, item, cvr_params=tower, ctr_params=tower)
    train_dl, _, test_dl = DataGenerator(x_tr, y_tr).generate_dataloader(
        x_val=x_te, y_val=y_te, x_test=x_te, y_test=y_te, batch_size=a["batch"]
    )
    n_params = sum(p.numel() for p in model.parameters())
    trainer = MTLTrainer(
        model,
        task_types=["classification"] * 3,
        optimizer_params={"lr": 1e-3, "weight_decay": 0.0},
        n_epoch=1,
        earlystop_patience=1,
        device=a.get("device", "cpu"),
        model_path=tempfile.mkdtemp(),
    )
    device = torch.device(a.get("device", "cpu"))
    t0 = time.perf_counter()
    trainer.train_one_epoch(train_dl)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    model.eval()
    preds = []
    with torch.no_grad():
        for x, _ in test_dl:
            preds.append(model({k: v.to(device) for k, v in x.items()}).cpu().numpy())
    pred_path = out.with_suffix(".pred.npy")
    np.save(pred_path, np.concatenate(preds))
    rss = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            rss = int(line.split()[1]) / 1024
    out.write_text(
        json.dumps(
            {
                "samples_per_second": round(len(y_tr) / sec, 1),
                "train_seconds": round(sec, 2),
                "rows": len(y_tr),
                "pred_path": str(pred_path),
                "embedding_rows": sum(card),
                "parameters": n_params,
                "peak_rss_mib": round(rss, 1),
                "notes": "rechub ESMM: per-field nn.Embedding, MLP with BatchNorm1d, no "
                "numerical input; DataLoader collates per row",
            }
        )
    )


if __name__ == "__main__":
    main()
