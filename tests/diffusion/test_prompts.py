"""PromptGrid: the items of a predict run, their errors, file names and what is left to generate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_nst.core.errors import NSTError
from lightning_nst.diffusion.prompts import PromptGrid
from lightning_nst.outputs import item_file, preview_file, slugify


def test_prompt_grid_expands_prompts_styles_and_seeds(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n  a dog  \n")
    grid = PromptGrid(
        prompts=["a fox"],
        prompts_file=str(prompts),
        seeds=[3, 4],
        style=["skimage:brick", "skimage:grass"],
        style_prompts=["in brick", "in grass"],
    )
    grid.setup("predict")
    items = grid.items
    assert len(items) == 3 * 2 * 2 and [item.index for item in items] == list(range(12))
    assert [(item.base_prompt, item.style_index, item.seed) for item in items[:4]] == [
        ("a fox", 0, 3),
        ("a fox", 0, 4),
        ("a fox", 1, 3),
        ("a fox", 1, 4),
    ]
    assert items[-1].prompt == "a dog, in grass" and items[-1].style == "skimage:grass"
    assert len(grid.style_images) == 2 and grid.style_images[0].shape[:2] == (1, 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompts": []}, "data.prompts: the list of prompts is empty"),
        ({"prompts": ["a"], "style": []}, "data.style: the list of style images is empty"),
        ({"prompts": ["a"], "style": ["nope.png"]}, "data.style[0]: image file not found"),
        ({"prompts": ["a"], "seeds": []}, "data.seeds: the list of seeds is empty"),
        ({"prompts": ["a"], "style": ["skimage:brick"], "style_prompts": []}, "data.style_prompts: give one entry"),
        ({"prompts_file": "missing.txt"}, "data.prompts_file: file not found"),
    ],
)
def test_prompt_grid_errors_name_the_key(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(NSTError) as error:
        PromptGrid(**kwargs).setup("predict")
    assert message in str(error.value)


def test_file_names_from_prompts_are_safe() -> None:
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("Crème brûlée / at noon") == "creme-brulee-at-noon"
    assert slugify("日本語") == "image"
    long = slugify("word " * 100)
    assert len(long) <= 40 and not long.endswith("-")


def test_file_names_of_items_and_previews() -> None:
    assert item_file(3, "A red house, by a lake!", 7) == "00003_a-red-house-by-a-lake_7.png"
    assert item_file(123456, "../..", 0) == "123456_image_0.png"
    assert preview_file(3, 40) == "00003_x0_040.png"


def test_finished_items_leave_the_loader_and_with_none_pending_it_is_empty() -> None:
    grid = PromptGrid(prompts=["a", "b"], seeds=[0, 1])
    grid.setup("predict")
    assert not grid.all_finished and len(grid.predict_dataloader()) == 4
    grid.skip([0, 2])
    assert [batch["index"] for batch in grid.predict_dataloader()] == [[1], [3]]
    grid.skip(range(4))  # what the writer does when an earlier run finished everything
    assert grid.all_finished and len(grid.predict_dataloader()) == 0


# -- the split over processes ---------------------------------------------------------------------------------------


def queues(items: int, processes: int, batch_size: int) -> list[Any]:
    """``processes`` ItemQueues of one run over ``items`` items, sharing one store as a run's processes do."""
    import torch.distributed

    from lightning_nst.diffusion.prompts import ItemDataset, ItemQueue

    grid = PromptGrid(prompts=["a house"], seeds=list(range(items)))
    dataset = ItemDataset(grid.expand())
    store = torch.distributed.HashStore()
    return [ItemQueue(dataset, processes, rank, batch_size, "run", store) for rank in range(processes)]


def test_the_queue_hands_each_item_to_one_process_in_the_batches_of_one_process() -> None:
    first, second = (iter(queue) for queue in queues(7, 2, 2))
    taken: dict[int, list[int]] = {0: [], 1: []}
    # Process 1 is three times as slow: it asks for a batch after every third of process 0's.
    for turn in range(12):
        for rank, queue in ((0, first), (1, second)) if turn % 3 == 0 else ((0, first),):
            batch = [index for _, index in zip(range(2), queue, strict=False)]
            taken[rank] += batch
    assert sorted(taken[0] + taken[1]) == list(range(7))  # every item once
    assert len(taken[0]) > len(taken[1]) > 0  # the slow process took fewer
    # Batches are handed out whole: what a process took is a union of one-process batches [0, 1], [2, 3], ...
    assert all(index ^ 1 in taken[rank] or index == 6 for rank in (0, 1) for index in taken[rank])


def test_the_queue_counts_what_every_process_finished() -> None:
    first, second = queues(5, 2, 1)
    first.finished(2)
    second.finished(1)
    assert first.done() == second.done() == 3 and len(first) == len(second) == 5
