"""A tiny random-weight llama GGUF (2 layers, 64-dim, byte-level SPM vocab; ~300 KB).

A real llama-server loads it in well under a second and answers /health and /completion,
which is all the tests and the demo need. Weights are seeded, so the file is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_LAYERS = 2
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
NATIVE_CTX = 2048
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = list(SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        *([gguf.TokenType.BYTE] * 256),
    ]
    return tokens, scores, [int(t) for t in types]


def write_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    native_ctx: int = NATIVE_CTX,
    name: str = "studio-engine tiny llama",
    wrong_shape: bool = False,
    split_max_tensors: int = 0,
    pooling_type: int | None = None,
    architecture: str = "llama",
    width: int = N_EMBD,  # 2 x width feed-forward
) -> Path:
    """Write the model to `path` (parents created) and return the path.

    `wrong_shape=True` writes a file whose header reads fine but whose attention tensor has
    the wrong shape: llama-server starts, then dies while loading it (a warm-up crash).
    `pooling_type=1` (mean) makes it an embedding model, as its header says.
    `architecture` names another architecture in the header (llama's tensors all the same):
    one this build does not know makes llama-server refuse the file.
    `width` (a multiple of 8) widens the embedding and feed-forward tensors, for a model big
    enough that mapping it takes a measurable time.
    `split_max_tensors=N` writes a split GGUF instead (`<stem>-00001-of-0000K.gguf`, ...,
    N tensors per shard) and returns the first shard.
    """
    if width < 64 or width % 8:
        raise ValueError(f"width must be a multiple of 8, at least 64, not {width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    head_dim = width // N_HEAD  # width: a multiple of 8

    writer = gguf.GGUFWriter(str(path), architecture, split_max_tensors=split_max_tensors)
    writer.add_name(name)
    writer.add_context_length(native_ctx)
    writer.add_embedding_length(width)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(2 * width)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    n_vocab = len(tokens)
    writer.add_tensor("token_embd.weight", weight(n_vocab, width))
    for layer in range(N_LAYERS):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(width, dtype=np.float32))
        q_rows = width + 8 if wrong_shape else width
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(q_rows, width))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(N_HEAD_KV * head_dim, width))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(N_HEAD_KV * head_dim, width))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(width, width))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(width, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(2 * width, width))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(2 * width, width))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(width, 2 * width))
    writer.add_tensor("output_norm.weight", np.ones(width, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, width))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    shards = writer.format_shard_names(path)
    writer.close()
    return shards[0]
