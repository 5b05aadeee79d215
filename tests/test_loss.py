import math

import torch
import torch.nn.functional as F

from kvtrain.loss import next_token_nll


def test_label_shift_matches_hand_computation():
    # vocab 3, one sequence [0, 2, 1]: logits at t predict token t+1.
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    ids = torch.tensor([[0, 2, 1]])
    nll, n = next_token_nll(logits, ids)
    expected = math.log(3) + (math.log(math.exp(2) + 2) - 0.0)  # -log p(2|t0) - log p(1|t1)
    assert n.item() == 2
    assert abs(nll.item() - expected) < 1e-5


def test_padding_never_contributes():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    ids = torch.randint(0, 7, (1, 5))
    nll, n = next_token_nll(logits, ids)
    # Right padding: two junk positions appended.
    padded_logits = torch.cat([logits, torch.randn(1, 2, 7)], 1)
    padded_ids = torch.cat([ids, torch.tensor([[6, 6]])], 1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    nll_r, n_r = next_token_nll(padded_logits, padded_ids, mask)
    # Left padding.
    left_logits = torch.cat([torch.randn(1, 2, 7), logits], 1)
    left_ids = torch.cat([torch.tensor([[6, 6]]), ids], 1)
    nll_l, n_l = next_token_nll(left_logits, left_ids, mask.flip(1))
    assert n.item() == n_r.item() == n_l.item() == 4
    torch.testing.assert_close(nll_r, nll)
    torch.testing.assert_close(nll_l, nll)
    manual = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
    torch.testing.assert_close(nll, manual)
