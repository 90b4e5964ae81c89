"""Host synchronisations, counted as ops (globalcom2._syncs) so that the CPU run tells what a GPU would wait for."""

import pytest
import torch

import globalcom2
from globalcom2._syncs import SyncCounter


def test_the_counter_sees_scalar_reads_sizes_from_data_and_tolist():
    x = torch.arange(6.0)
    with SyncCounter() as syncs:
        x.sum().item()
        int(x[0])
        bool(x.any())
        x.tolist()
        x[x > 2]
        x.nonzero()
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # size given: no sync
        x.cumsum(0), x.argsort(), x.index_select(0, torch.tensor([1]))  # none of these
    assert syncs.count == 7, syncs.by_op
    assert syncs.by_op["aten._local_scalar_dense"] == 3
    assert syncs.by_op["Tensor.tolist"] == 1


@pytest.mark.parametrize("sizes", [[(672, 672)], [(500, 800), (336, 1100)]])
def test_a_patched_prefill_syncs_at_most_once_more_than_vanilla(tiny, image_factory, sizes):
    model, processor = tiny
    images = [image_factory(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    prompts = ["<image>\nWhat is shown?", "<image>\nDescribe it in detail please."][: len(images)]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        with SyncCounter() as vanilla:
            model(**inputs)
        for method in ("globalcom2", "fastervlm"):
            globalcom2.apply(model, method=method)
            try:
                with SyncCounter() as patched:
                    model(**inputs)
            finally:
                globalcom2.remove(model)
            assert patched.count <= vanilla.count + 1, (method, vanilla.by_op, patched.by_op)


def test_compression_of_an_encoded_batch_syncs_once(tiny, image_factory):
    model, processor = tiny
    images = [image_factory(h, w, seed=i) for i, (h, w) in enumerate([(672, 672), (300, 900), (336, 336), (900, 300)])]
    inputs = processor(images=images, text=["<image>x"] * 4, return_tensors="pt", padding=True)
    globalcom2.apply(model)
    adapter = globalcom2.get_family(model)
    with torch.no_grad():
        encoded = adapter.encode(inputs["pixel_values"], inputs["image_sizes"])
        with SyncCounter() as syncs:
            adapter.compress(encoded)
    assert syncs.count == 1, syncs.by_op
