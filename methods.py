"""The methods: every way to store an embedding and search it, each declared once, and the registry of them.

(Being built: for now the binary codes' packing and faiss search.)
"""

import faiss
import numpy as np
import torch


def pack_codes(bits: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bool bits (n, b) -> uint8 codes (n, ceil(b / 8)), as np.packbits lays them out and faiss binary indexes take."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1)


def build_binary_index(codes: np.ndarray) -> faiss.IndexBinaryFlat:
    """Exact Hamming search over packed codes. Padding bits are 0 in every code, so distances are unchanged."""
    index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    index.add(codes)
    return index


def rescore_search(binary_index, float_docs: np.ndarray, float_queries: np.ndarray, query_codes: np.ndarray, k: int, top: int):
    """Hamming top-k from `binary_index`, re-ranked by float query . float document. Returns (scores, ids), each (q, top).

    For top > k, the Hamming ranks k+1..top follow in Hamming order, scored below every re-ranked document, so
    metrics at cut-offs above k see the binary search's list rather than a truncated one."""
    _, candidates = binary_index.search(query_codes, max(k, top))
    head = candidates[:, :k]
    scores = (float_docs[head] @ float_queries[:, :, None])[:, :, 0]  # gather k rows per query, small matmul
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(head, order, 1)
    if top > k:
        tail = scores[:, -1:] - 1 - np.arange(top - k, dtype=scores.dtype)  # strictly below the head, in Hamming order
        scores, ids = np.concatenate([scores, tail], axis=1), np.concatenate([ids, candidates[:, k:top]], axis=1)
    return scores, ids


