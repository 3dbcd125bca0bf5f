"""The evaluation hook's sample grid (ldm_jax.training.eval_hook.eval_grid): which of the scored
samples land where. The truth is the label layout the hook samples with (``arange(K) % classes``)
and images that encode their own index."""

import numpy as np
import pytest

from ldm_jax.training.eval_hook import eval_grid, eval_settings


def _indexed_images(n):
    # image i is filled with the value i, so a grid cell tells which sample it holds
    return np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)


def test_rows_are_classes_and_columns_their_first_samples():
    labels = np.arange(50) % 10  # 5 samples per class, as config.eval lays them out
    images, width = eval_grid(_indexed_images(50), labels, rows=3, columns=4)
    assert width == 4
    held = images[:, 0, 0, 0].reshape(3, 4)
    # class y's samples are y, y + 10, y + 20, ...
    np.testing.assert_array_equal(held, [[0, 10, 20, 30], [1, 11, 21, 31], [2, 12, 22, 32]])


def test_a_short_class_narrows_the_grid_and_unconditional_takes_the_first():
    labels = np.arange(16) % 10  # classes 0-5 have 2 samples, 6-9 have 1
    images, width = eval_grid(_indexed_images(16), labels, rows=10, columns=8)
    assert width == 1
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(10))
    images, width = eval_grid(_indexed_images(16), None, rows=2, columns=3)
    assert width == 3
    np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(6))


@pytest.mark.parametrize("override", [{"grid_columns": -1}, {"grid_columns": 4, "grid_rows": 0}])
def test_bad_grid_settings_fail_with_one_line(override):
    from configs import digits_ldm

    c = digits_ldm.get_config("runlocal")
    for k, v in override.items():
        c.eval[k] = v
    with pytest.raises(ValueError, match="config.eval.grid_columns") as info:
        eval_settings(c)
    assert "\n" not in str(info.value)
