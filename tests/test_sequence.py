import pytest
import torch

from globalcom2.core.sequence import infer_padding_side, shrink_placeholders

I = 9  # image placeholder id
P = 0  # pad id


def test_left_padded_batch_with_two_images_in_one_prompt():
    ids = torch.tensor([
        [P, P, 5, I, I, I, 6, I, I, 7],
        [5, I, I, I, I, 6, 6, 6, 6, 6],
    ])
    mask = (ids != P).long()
    # images in reading order: row 0 has 3 then 2 placeholders, row 1 has 4.
    out = shrink_placeholders(ids, I, [3, 2, 4], [1, 2, 2], attention_mask=mask, pad_token_id=P)
    assert out.padding_side == "left"
    assert out.input_ids.tolist() == [
        [P, P, 5, I, 6, I, I, 7],
        [5, I, I, 6, 6, 6, 6, 6],
    ]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
    assert out.attention_mask.dtype == mask.dtype


def test_right_padding_and_labels_move_with_their_tokens():
    ids = torch.tensor([[5, I, I, 6, 7], [5, I, I, P, P]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 6, 7], [-100, -100, -100, -100, -100]])
    out = shrink_placeholders(ids, I, [2, 2], [1, 0], attention_mask=mask, labels=labels, pad_token_id=P)
    assert out.padding_side == "right"
    assert out.input_ids.tolist() == [[5, I, 6, 7], [5, P, P, P]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.labels.tolist() == [[-100, -100, 6, 7], [-100, -100, -100, -100]]


def test_no_mask_given_but_lengths_differ_creates_left_padding():
    ids = torch.tensor([[5, I, I, I], [I, I, I, 6]])
    out = shrink_placeholders(ids, I, [3, 3], [3, 1])
    assert out.input_ids.tolist() == [[5, I, I, I], [P, P, I, 6]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_no_mask_needed_stays_none():
    ids = torch.tensor([[5, I, I, 6]])
    out = shrink_placeholders(ids, I, [2], [1])
    assert out.attention_mask is None
    assert out.input_ids.tolist() == [[5, I, 6]]


def test_text_only_rows_pass_through():
    ids = torch.tensor([[5, 6, 7], [P, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    out = shrink_placeholders(ids, I, [], [], attention_mask=mask, pad_token_id=P)
    assert torch.equal(out.input_ids, ids) and torch.equal(out.attention_mask, mask)


def test_placeholder_count_mismatch_is_a_clear_error():
    ids = torch.tensor([[5, I, I, 6]])
    with pytest.raises(ValueError, match="num_additional_image_tokens"):
        shrink_placeholders(ids, I, [3], [1])


def test_infer_padding_side():
    assert infer_padding_side(None) == "left"
    assert infer_padding_side(torch.tensor([[1, 1], [1, 1]])) == "left"
    assert infer_padding_side(torch.tensor([[0, 1], [1, 1]])) == "left"
    assert infer_padding_side(torch.tensor([[1, 0], [1, 1]])) == "right"


def test_shrinking_reads_the_host_once():
    from globalcom2._syncs import SyncCounter

    ids = torch.tensor([[P, P, 5, I, I, I, 6], [5, I, I, 6, I, I, 7]])
    mask = (ids != P).long()
    labels = ids.clone()
    for side in (None, "right"):
        with SyncCounter() as syncs:
            shrink_placeholders(ids, I, [3, 2, 2], [1, 2, 1], attention_mask=mask, labels=labels,
                                pad_token_id=P, padding_side=side)
        assert syncs.count == 1, syncs.by_op
    with SyncCounter() as syncs:  # counts given as tensors: their sum joins the same read
        shrink_placeholders(ids, I, torch.tensor([3, 2, 2]), torch.tensor([1, 2, 1]), attention_mask=mask, pad_token_id=P)
    assert syncs.count == 1, syncs.by_op
