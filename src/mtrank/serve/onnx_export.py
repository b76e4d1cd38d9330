"""Export a bundle's model to ONNX, and run an exported file with onnxruntime.

The graph takes the already-encoded features (encoding stays in Python, shared with training, so
train/serve parity does not depend on re-implementing vocabularies in the graph):

* inputs: ``categorical`` int64 ``[B, n_cat]`` (0 = missing, 1 = OOV), ``numerical`` float32
  ``[B, n_num]`` (standardised); ``B`` is a dynamic axis named ``batch``;
* outputs: ``p_ctr``, ``p_cvr``, ``p_ctcvr``, float32 ``[B]`` each (or ``p_<task>`` for a plain
  multi-task model), named.

A model with no categorical (or no numerical) feature still has both inputs; the empty one has
a second dimension of 0.

List and sequence features (docs/features.md) add one input per tensor of the models' ``*extra``
slot, named after the column (``hist_purchased`` int64 ``[B, L]``; a weighted list's weights
``<column>.weight`` float32 ``[B, L]``), each with a dynamic length axis ``len_<k>``, so a
request pads to its own longest list.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtrank.errors import BundleError, MtrankError
from mtrank.io_utils import atomic_write_bytes
from mtrank.bundle import Bundle, codec, probability_outputs

OPSET = 18
INPUTS = ("categorical", "numerical")


class ExportError(MtrankError):
    """The model could not be exported, or the exported graph disagrees with PyTorch."""


def output_names(bundle: Bundle) -> list[str]:
    """Names of the probability outputs, in graph order: ``p_ctr, p_cvr, p_ctcvr`` for a funnel
    (:func:`mtrank.bundle.probability_outputs`; per stage on a staged funnel)."""
    return list(probability_outputs(bundle.spec))


class _ProbabilityHead(nn.Module):
    """Wraps a model so that forward returns a tuple of the named probabilities (ONNX needs a
    fixed output order; the names travel as ONNX output names)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(
        self, categorical: torch.Tensor, numerical: torch.Tensor, *extra: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(categorical, numerical, *extra)
        probs = tuple(out[n] for n in self.names)
        # A model without categorical (or numerical) features never reads that input, and the
        # exporter would drop it from the graph. Adding the sum over its empty feature axis
        # (exactly 0.0) keeps the input without changing any output bit.
        if categorical.shape[1] == 0:
            probs = tuple(p + categorical.sum(dim=1).to(p.dtype) for p in probs)
        if numerical.shape[1] == 0:
            probs = tuple(p + numerical.sum(dim=1) for p in probs)
        return probs


def example_inputs(bundle: Bundle, batch: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Random valid encoded inputs: int64 ``[batch, n_cat]`` ids below each cardinality,
    float32 ``[batch, n_num]`` standard-normal values and, per list/sequence tensor, ``[batch,
    L]`` ids (with padding zeros; ``L`` = 2 + seed % 5, so verification covers several lengths)
    and weights."""
    g = np.random.default_rng(seed)
    cards = bundle.spec.cardinalities
    cat = (
        np.stack([g.integers(0, c, size=batch) for c in cards], axis=1)
        if cards
        else np.zeros((batch, 0), np.int64)
    )
    num = g.standard_normal((batch, bundle.spec.n_numerical)).astype(np.float32)
    extra: list[np.ndarray] = []
    length = 2 + seed % 5
    for f in bundle.spec.lists:
        rows = f.cardinality if f.kind == "list" else cards[f.shares]
        ids = g.integers(0, rows, size=(batch, length))
        ids[:, length // 2 :] *= g.random((batch, length - length // 2)) < 0.5  # some padding
        extra.append(ids.astype(np.int64))
        if f.weighted:
            extra.append(g.random((batch, length)).astype(np.float32))
    return (cat.astype(np.int64), num, *extra)


def input_names(bundle: Bundle) -> list[str]:
    """Graph input names: ``categorical``, ``numerical``, then one per list/sequence tensor."""
    return [*INPUTS, *bundle.encoder.extra_names]


def to_onnx_bytes(bundle: Bundle) -> bytes:
    """The model as a serialized ONNX ``ModelProto`` (opset 18, dynamic batch axis).

    Raises:
        ExportError: torch.onnx cannot export the model, or it is not a neural model (a
            LambdaMART ranker stays in LightGBM's own ``model.txt``).
    """
    if not isinstance(bundle.model, torch.nn.Module):
        raise ExportError(
            f"model {bundle.model_config.name!r} is not a neural network: ONNX export covers "
            "the neural models; this bundle's model is served from its own "
            f"{codec(bundle.model_config).weights_file}"
        )
    names = output_names(bundle)
    head = _ProbabilityHead(bundle.model, names).eval()
    args = tuple(torch.from_numpy(a) for a in example_inputs(bundle, batch=3))
    inputs = input_names(bundle)
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: fast (≈1 s), no onnxscript dependency at export
            # time, and it keeps an unused input (zero categorical features) in the graph.
            torch.onnx.export(
                head,
                args,
                buf,
                input_names=inputs,
                output_names=names,
                dynamic_axes={
                    **{i: {0: "batch"} for i in INPUTS},
                    **{i: {0: "batch", 1: f"len_{k}"} for k, i in enumerate(inputs[2:])},
                    **{o: {0: "batch"} for o in names},
                },
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # torch raises many types here; report one clear line
        raise ExportError(
            f"ONNX export of model {bundle.model_config.name!r} failed: {exc}"
        ) from exc
    return buf.getvalue()


class OnnxScorer:
    """Run an exported model with onnxruntime (CPU).

    Args:
        model: path to a ``.onnx`` file or its bytes.
        threads: intra-op threads (0 = onnxruntime's default).

    Shapes: ``__call__(categorical int64 [B, n_cat], numerical float32 [B, n_num])`` → dict of
    float32 ``[B]`` arrays by output name.
    """

    def __init__(self, model: str | Path | bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        src = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(
        self, categorical: np.ndarray, numerical: np.ndarray, *extra: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``p_ctr``, ``p_cvr``, ``p_ctcvr`` ``[B]`` from ids ``[B, n_cat]`` int64, numbers
        ``[B, n_num]`` float32 and the list/sequence tensors ``[B, L]`` (graph input order)."""
        feeds = dict(zip(self.inputs, (categorical, numerical, *extra), strict=True))
        res = self.session.run(self.outputs, feeds)
        return dict(zip(self.outputs, res, strict=True))


def torch_probabilities(
    bundle: Bundle, categorical: np.ndarray, numerical: np.ndarray, *extra: np.ndarray
) -> dict[str, np.ndarray]:
    """PyTorch reference outputs (eval mode, no grad): float32 ``[B]`` per name."""
    with torch.no_grad():
        out = bundle.model.eval()(
            torch.from_numpy(categorical),
            torch.from_numpy(numerical),
            *(torch.from_numpy(t) for t in extra),
        )
    return {n: out[n].numpy() for n in output_names(bundle)}


def verify_onnx(
    bundle: Bundle,
    model: str | Path | bytes,
    batches: tuple[int, ...] = (1, 7, 1000),
    atol: float = 1e-5,
) -> dict[int, float]:
    """Run the ONNX graph at several batch sizes and compare with PyTorch.

    Returns:
        the largest absolute difference over all outputs, per batch size.

    Raises:
        ExportError: an output differs by more than ``atol`` or has the wrong shape.
    """
    scorer = OnnxScorer(model)
    diffs: dict[int, float] = {}
    for b in batches:
        inputs = example_inputs(bundle, b, seed=b)
        ref = torch_probabilities(bundle, *inputs)
        got = scorer(*inputs)
        worst = 0.0
        for name, want in ref.items():
            if got[name].shape != (b,):
                raise ExportError(
                    f"ONNX output {name} has shape {got[name].shape} at batch {b}, expected ({b},)"
                )
            worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - want))))
        if worst > atol:
            raise ExportError(
                f"ONNX and PyTorch differ by {worst:.2e} > {atol:g} at batch size {b}"
            )
        diffs[b] = worst
    return diffs


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of an ONNX graph, as the graph declares it.

    Attributes:
        name: the tensor's name (``categorical``, ``hist_purchased``, ``p_ctcvr`` …).
        dtype: its element type, as numpy names it (``int64``, ``float32``).
        shape: its dimensions: an int for a fixed one, the axis name for a dynamic one
            (``batch``, ``len_0``).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]


def graph_signature(model: str | Path | bytes) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """The (inputs, outputs) of an ONNX graph, in graph order, read from the file (or its bytes).

    Raises:
        ExportError: the file is not an ONNX model.
    """
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        proto = (
            onnx.load_model_from_string(model)
            if isinstance(model, bytes)
            else onnx.load_model(str(model), load_external_data=False)
        )
    except Exception as exc:  # protobuf's DecodeError, OSError, …: one clear line
        where = "the given bytes" if isinstance(model, bytes) else str(model)
        raise ExportError(f"cannot read an ONNX graph from {where}: {exc}") from exc

    def tensors(values) -> list[GraphTensor]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
            out.append(GraphTensor(v.name, str(tensor_dtype_to_np_dtype(t.elem_type)), dims))
        return out

    return tensors(proto.graph.input), tensors(proto.graph.output)


def export_onnx(
    bundle_path: str | Path, out: str | Path | None = None, *, verify: bool = True
) -> tuple[Path, dict[int, float]]:
    """Export the bundle at ``bundle_path`` to ``out`` (default ``<bundle>/model.onnx``).

    The file is written atomically, and only after it has been verified against PyTorch at batch
    sizes 1, 7 and 1000 (when ``verify``).

    Returns:
        (the written path, max |ONNX − PyTorch| per verified batch size).

    Raises:
        BundleError: the bundle cannot be loaded. ExportError: export or verification failed.
    """
    bundle = Bundle.load(bundle_path)
    data = to_onnx_bytes(bundle)
    diffs = verify_onnx(bundle, data) if verify else {}
    path = Path(out) if out is not None else Path(bundle_path) / "model.onnx"
    if path.is_dir():
        raise BundleError(f"--out {path} is a directory; give a file name such as model.onnx")
    atomic_write_bytes(data, path)
    return path, diffs
