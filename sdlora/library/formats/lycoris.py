"""LyCORIS layers (LoHa, LoKr, Tucker LoCon) rewritten exactly as plain LoRA layers.

The updates, as LyCORIS defines them and AUTOMATIC1111 and ComfyUI apply them:
- LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r, r = rows of w1b.
- LoKr: ΔW = kron(W1, W2) · s, Wi = lokr_wi or lokr_wi_a·lokr_wi_b; s = alpha/r with r the
  rank of the last factored one (w2, else w1), and s = 1 when both are full matrices.
- Tucker variants: a factor is t[i,j,kh,kw]·a[i,out]·b[j,in] (hada_t1/t2, lokr_t2; a, b then
  hold the rank in their first axis); a LoCon lora_mid sits between down and up.

Why this is exact without any decomposition: a Hadamard product of rank-r1 and rank-r2
products is the product of their face-splitting factors (rank r1·r2), and a Kronecker product
of products is the product of the Kronecker factors. Where that rank would exceed the layer's
own, the full ΔW is stored against an identity, which is exact too.
"""

from __future__ import annotations

import torch

from sdlora.library.formats.adapter import LoraLayer, alpha_or_rank

HADA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def locon_with_mid(down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, alpha: float) -> LoraLayer:
    """Tucker LoCon: fold lora_mid (r, r, kh, kw) into down (r, in, 1, 1) -> down (r, in, kh, kw)."""
    folded = torch.einsum("abhw,bi->aihw", mid.float(), down.float().flatten(1))
    return LoraLayer(folded, up.float(), alpha)


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """t[i,j,kh,kw]·a[i,out]·b[j,in] -> (out, in, kh, kw)."""
    return torch.einsum("ijhw,ip,jr->prhw", core.float(), a.float(), b.float())


def loha(parts: dict[str, torch.Tensor], alpha: float | None, shape: tuple[int, ...]) -> LoraLayer:
    """A LoHa layer as an exact LoRA of rank r1·r2 (or the full ΔW where that is smaller)."""
    w1a, w1b, w2a, w2b = (parts[k].float() for k in HADA_KEYS)
    rank = w1b.shape[0]
    scale = alpha_or_rank(alpha, rank) / rank
    if "hada_t1" in parts:
        delta = _tucker(parts["hada_t1"], w1a, w1b) * _tucker(parts["hada_t2"], w2a, w2b)
        return _full(delta.reshape(shape), scale)
    up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)  # (out, r1·r2)
    down = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)  # (r1·r2, in·kh·kw)
    return _low_rank(up, down, scale, shape)


def lokr(parts: dict[str, torch.Tensor], alpha: float | None, shape: tuple[int, ...]) -> LoraLayer:
    """A LoKr layer as an exact LoRA: kron(A1, A2)·kron(B1, B2) with each Wi = Ai·Bi."""
    rank = None
    if "lokr_w1" in parts:
        a1, b1 = _as_product(parts["lokr_w1"].float())
    else:
        a1, b1 = parts["lokr_w1_a"].float(), parts["lokr_w1_b"].float()
        rank = b1.shape[0]
    if "lokr_t2" in parts:
        w2 = _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
        rank = parts["lokr_w2_b"].shape[0]
        a2, b2 = _as_product(w2.flatten(1))
    elif "lokr_w2" in parts:
        a2, b2 = _as_product(parts["lokr_w2"].float().flatten(1))
    else:
        a2, b2 = parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float().flatten(1)
        rank = b2.shape[0]
    scale = 1.0 if rank is None else alpha_or_rank(alpha, rank) / rank
    # kron of the flattened factors equals the flattened kron of (W1 as (o1, i1, 1, 1)) and W2 (o2, i2, kh, kw).
    return _low_rank(torch.kron(a1, a2), torch.kron(b1, b2), scale, shape)


def _as_product(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix as a·b with the identity on its shorter side."""
    rows, cols = matrix.shape
    if rows <= cols:
        return torch.eye(rows), matrix
    return matrix, torch.eye(cols)


def _low_rank(up: torch.Tensor, down: torch.Tensor, scale: float, shape: tuple[int, ...]) -> LoraLayer:
    out, flat_in = shape[0], int(torch.tensor(shape[1:]).prod())
    if up.shape[1] >= min(out, flat_in):
        return _full((up @ down).reshape(shape), scale)
    return LoraLayer(down.reshape(down.shape[0], *shape[1:]), _up_shape(up, shape), scale * up.shape[1])


def _full(delta: torch.Tensor, scale: float) -> LoraLayer:
    """ΔW itself against an identity on its shorter side: exact at rank min(out, in·kh·kw)."""
    out, flat_in = delta.shape[0], delta[0].numel()
    matrix = delta.reshape(out, flat_in)
    if flat_in <= out:
        down = torch.eye(flat_in).reshape(flat_in, *delta.shape[1:])
        return LoraLayer(down, _up_shape(matrix, delta.shape), scale * flat_in)
    return LoraLayer(matrix.reshape(delta.shape), _up_shape(torch.eye(out), delta.shape), scale * out)


def _up_shape(up: torch.Tensor, shape) -> torch.Tensor:
    return up.reshape(up.shape[0], up.shape[1], 1, 1) if len(shape) == 4 else up
