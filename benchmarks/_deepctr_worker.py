"""DeepCTR-Torch's ESMM (``deepctr_torch.models.multitask.ESMM``), trained by its own
``BaseModel.fit``, for ``throughput.py``. Runs in the DeepCTR-Torch virtual environment (no mtrank
import).

Usage: ``python _deepctr_worker.py ARGS_JSON OUT_JSON``. Reads the encoded ids and standardised
numerical columns exported by ``throughput.py`` (``npz``: ``train_x`` / ``test_x`` int64
``[N, n_fields]``, ``train_num`` / ``test_num`` float32 ``[N, n_num]``, click and conversion
labels, ``cardinalities``, ``fields``, ``numerical``), trains one epoch with the library's own
defaults except the shared architecture (embedding, towers, batch), times ``fit``, and writes the
test predictions ``[N, 3]`` (pCTR, pCVR = pCTCVR / pCTR, pCTCVR) next to the result.

Offline: DeepCTR-Torch imports ``requests`` (undeclared) and starts a thread at import that asks
PyPI for its latest version. A stub ``requests`` module whose ``get`` raises is installed before
the import, so the check fails at once without touching the network.
"""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path


def _offline_requests() -> None:
    stub = types.ModuleType("requests")

    def get(*_args, **_kwargs):
        raise ConnectionError("benchmark is offline: DeepCTR-Torch's version check disabled")

    stub.get = get
    stub.codes = types.SimpleNamespace(ok=200)
    sys.modules["requests"] = stub


def main() -> None:
    a = json.loads(sys.argv[1])
    out = Path(sys.argv[2])
    _offline_requests()
    import numpy as np
    import torch

    torch.set_num_threads(a["threads"])
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models.multitask import ESMM

    z = np.load(a["npz"])
    fields = [str(f) for f in z["fields"]]
    nums = [str(f) for f in z["numerical"]]
    pad = a.get("pad") or {}
    card = [max(int(c), pad.get(f, 0)) for f, c in zip(fields, z["cardinalities"], strict=True)]
    cols = [
        SparseFeat(f, vocabulary_size=c, embedding_dim=a["emb"])
        for f, c in zip(fields, card, strict=True)
    ]
    cols += [DenseFeat(f, 1) for f in nums]

    def xy(split: str):
        x = {f: z[f"{split}_x"][:, j] for j, f in enumerate(fields)}
        x.update({f: z[f"{split}_num"][:, j] for j, f in enumerate(nums)})
        click, conv = z[f"{split}_click"], z[f"{split}_conv"]
        return x, np.stack([click, click * conv], axis=1).astype(
            np.float32
        )  # DeepCTR's ESMM: ctr, ctcvr

    x_tr, y_tr = xy("train")
    if a.get("max_rows"):
        x_tr, y_tr = {k: v[: a["max_rows"]] for k, v in x_tr.items()}, y_tr[: a["max_rows"]]
    x_te, _ = xy("test")
    model = ESMM(
        cols, tower_dnn_hidden_units=tuple(a["tower"]), seed=a.get("seed", 0), device="cpu"
    )
    model.compile("adam", loss=["binary_crossentropy", "binary_crossentropy"])  # Adam lr 1e-3
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model.fit(x_tr, y_tr, batch_size=a["batch"], epochs=1, verbose=0, shuffle=True)
    sec = time.perf_counter() - t0
    p = model.predict(x_te, batch_size=8192)  # [N, 2]: pCTR, pCTCVR
    pred = np.stack([p[:, 0], p[:, 1] / np.maximum(p[:, 0], 1e-12), p[:, 1]], axis=1)
    pred_path = out.with_suffix(".pred.npy")
    np.save(pred_path, pred)
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
                "notes": "DeepCTR-Torch ESMM: per-field nn.Embedding N(0,1e-4), DNN weights "
                "N(0,1e-4), one output bias for both "
                "towers, BCE on probabilities summed over the batch, L2 1e-5 on all embedding "
                "tables; TensorDataset loader",
            }
        )
    )


if __name__ == "__main__":
    main()
