"""TransMIL: Nystrom attention against exact attention, the grid of PPEG, the squaring, FLOPs."""

import torch

from steph.models.flops import count_flops
from steph.models.transmil import (
    PPEG,
    NystromAttention,
    TransMIL,
    moore_penrose_pinv,
    nystrom_attention,
)


def sharp_qk(h=2, n=6, d=8, scale=3.0, seed=0):
    """Queries = keys with large norms: softmax(q k^T) is close to the identity, so the kernel
    matrices are well conditioned and the iterative pseudo-inverse converges fast."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(h, n, d, generator=g, dtype=torch.float64) * scale
    return q, q.clone(), torch.randn(h, n, d, generator=g, dtype=torch.float64)


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    q, k, _ = sharp_qk()
    a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    torch.testing.assert_close(moore_penrose_pinv(a, 20), torch.linalg.pinv(a))
    # a rank-deficient matrix (two equal rows, as zero-padded landmarks give): 6 iterations reach
    # the Moore-Penrose inverse; far more let rounding errors grow in the null space, while
    # A Z A = A still holds (what the Nystrom product needs)
    b = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.1, 0.2, 0.7]], dtype=torch.float64)
    torch.testing.assert_close(moore_penrose_pinv(b, 6), torch.linalg.pinv(b))
    torch.testing.assert_close(b @ moore_penrose_pinv(b, 40) @ b, b)


def test_nystrom_is_exact_softmax_attention_when_every_token_is_a_landmark():
    q, k, v = sharp_qk(n=6)
    q = q / 8 ** 0.5
    exact = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    torch.testing.assert_close(nystrom_attention(q, k, v, n_landmarks=6, pinv_iterations=20),
                               exact)
    # the 6 iterations TransMIL uses are already close on a well-conditioned kernel
    assert (nystrom_attention(q, k, v, 6, 6) - exact).abs().max() < 1e-3


def test_landmarks_are_segment_means():
    """With 2 landmarks over 4 tokens and one key per segment equal to its mean, the kernels
    are hand-checkable: q_l / k_l are the means of tokens (0, 1) and (2, 3)."""
    q = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]]], dtype=torch.float64)
    k = q.clone()
    v = torch.eye(4, dtype=torch.float64)[None]
    ql = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    k1 = torch.softmax(q @ ql.transpose(-1, -2), -1)
    k2 = torch.softmax(ql @ ql.transpose(-1, -2), -1)
    k3 = torch.softmax(ql @ k.transpose(-1, -2), -1)
    hand = k1 @ torch.linalg.pinv(k2) @ (k3 @ v)
    torch.testing.assert_close(nystrom_attention(q, k, v, 2, 30), hand)


def test_nystrom_module_pads_at_the_front_and_keeps_the_last_tokens():
    torch.manual_seed(0)
    attn = NystromAttention(8, heads=2, n_landmarks=4, residual_kernel=None, dropout=0.0).eval()
    x = torch.randn(6, 8)  # padded with 2 zero tokens in front to 8 = 2 segments of 4
    out = attn(x)
    assert out.shape == (6, 8)
    # the module's output equals the functional core on the explicitly padded sequence
    xp = torch.cat([torch.zeros(2, 8), x])
    q, k, v = (t.reshape(8, 2, 4).transpose(0, 1) for t in attn.to_qkv(xp).chunk(3, -1))
    core = nystrom_attention(q * 4 ** -0.5, k, v, 4, 6).transpose(0, 1).reshape(8, 8)
    torch.testing.assert_close(out, attn.to_out(core)[2:])


def test_ppeg_convolves_on_the_row_major_grid():
    """One non-zero token at grid cell (row 2, col 1) of a 5 x 5 grid: PPEG changes exactly the
    tokens within the 7x7 window around it (Chebyshev distance <= 3), and the class token never."""
    torch.manual_seed(0)
    ppeg = PPEG(3)
    with torch.no_grad():
        for conv in (ppeg.proj7, ppeg.proj5, ppeg.proj3):
            conv.weight.uniform_(0.5, 1.0)  # positive: no accidental cancellation
            conv.bias.zero_()
    x = torch.zeros(1 + 25, 3)
    x[1 + 2 * 5 + 1] = 1.0
    out = ppeg(x, 5)
    changed = (out - x).abs().sum(1)[1:].reshape(5, 5) > 0
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing="ij")
    expected = torch.maximum((rows - 2).abs(), (cols - 1).abs()) <= 3
    assert torch.equal(changed, expected)
    torch.testing.assert_close(out[0], x[0])


def test_sequence_is_squared_by_repeating_its_first_tokens():
    torch.manual_seed(0)
    model = TransMIL(12, 4, dim=16, heads=2, n_landmarks=8, residual_kernel=5).eval()
    seen = {}
    model.layer1.register_forward_hook(lambda m, args, out: seen.setdefault("in", args[0]))
    x = torch.randn(7, 12)  # side 3: 9 cells, the first 2 tokens repeated
    model(x)
    h = seen["in"]
    assert h.shape == (1 + 9, 16)
    torch.testing.assert_close(h[0], model.cls_token[0])
    torch.testing.assert_close(h[1 + 7:], h[1:3])
    torch.testing.assert_close(h[1:8], model.feat_proj(x))


def test_flops_at_10k_match_table_s4_counting_layers():
    """Table S4's 60.3 GFLOPs is what nn.Linear / nn.Conv layers do (2 FLOPs per multiply-add);
    torch's flop counter also counts Nystrom attention's own matrix products."""
    n, d, c = 10_000, 1536, 512
    with torch.device("meta"):
        model = TransMIL(d, 32)
    flops = count_flops(model, torch.empty(n, d, device="meta"))
    tp = 40 * 256  # class token + the 100 x 100 square, zero-padded in front to 40 x 256
    m, h, dh = 256, 8, 64
    per_layer = 2 * tp * c * 3 * c + 2 * tp * c * c + 2 * h * tp * dh * 33  # qkv, out, res conv
    layers = 2 * n * d * c + 2 * per_layer + 2 * (100 * 100) * c * (49 + 25 + 9) + 2 * c * 32
    assert flops.layers == layers
    assert round(layers / 1e9, 1) == 60.2  # Table S4: 60.3
    # kernels q k_l^T, q_l k_l^T, q_l k^T, (k3 v), (k1 pinv), (. @ k3v); 4 products per iteration
    attn = h * (2 * tp * m * dh * 2 + 2 * m * m * dh + 2 * m * tp * dh + 2 * tp * m * m
                + 2 * tp * m * dh) + 6 * 4 * h * 2 * m ** 3
    assert flops.total == layers + 2 * attn
