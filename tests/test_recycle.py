"""`recycle.Spares`: a finished request's step tensors serve the next request of the same shape."""

import gc

import torch

from hf_squeeze.recycle import Spares


class Owner:  # stands for a cache layer: what adopts tensors and is garbage collected
    pass


def test_a_spare_serves_the_next_owner_of_its_shape_with_the_new_values():
    spares = Spares()
    first = Owner()
    kept = spares.adopt(first, (0, "keys"), torch.randn(2, 3))
    assert len(spares) == 0  # nothing handed back yet: the first owner lives
    second_values = torch.randn(2, 3)
    second = Owner()
    assert spares.adopt(second, (0, "keys"), second_values.clone()).data_ptr() != kept.data_ptr()
    address = kept.data_ptr()
    del first, kept
    gc.collect()
    assert len(spares) == 1
    third = Owner()
    got = spares.adopt(third, (0, "keys"), second_values.clone())
    assert got.data_ptr() == address and torch.equal(got, second_values)
    assert len(spares) == 0
    # another layer or another shape does not take it
    del third, got
    gc.collect()
    other = Owner()
    assert spares.adopt(other, (1, "keys"), torch.randn(2, 3)).data_ptr() != address
    assert spares.adopt(other, (0, "keys"), torch.randn(4, 3)).data_ptr() != address
    assert len(spares) == 1


def test_spares_hold_the_last_request_only_and_clear():
    spares = Spares()
    for shape in ((2, 3), (5, 3), (7, 3)):  # requests of other shapes, one after another
        owner = Owner()
        spares.adopt(owner, (0, "keys"), torch.randn(shape))
        del owner
        gc.collect()
    assert len(spares) == 1  # one spare per layer and tensor, not one per shape seen
    spares.clear()
    assert len(spares) == 0


def test_an_owner_adopting_again_hands_back_what_it_adopted_before():
    spares = Spares()
    owner = Owner()
    before = spares.adopt(owner, (0, "pins"), torch.randn(3))
    assert spares.adopt(owner, (0, "pins"), before) is before  # the same tensor: nothing changes
    assert len(spares) == 0
    after = spares.adopt(owner, (0, "pins"), torch.randn(3))  # a new request of the same owner
    assert after.data_ptr() == before.data_ptr()  # took back the memory it handed back
    assert spares.adopt(owner, (0, "length"), None) is None


def test_a_finalizer_run_inside_adopt_does_not_deadlock():
    """A garbage collection can start at any allocation, also inside `adopt` while it holds its lock,
    and run the finalizer of a dead owner (`_give_back`, which takes the lock) on the same thread."""
    import threading

    spares = Spares()
    dead = Owner()
    dead.cycle = dead  # collected by the cyclic collector only
    spares.adopt(dead, (0, "keys"), torch.randn(3))
    del dead
    done = []

    def collect_while_holding_the_lock():
        with spares._lock:  # as inside adopt
            gc.collect()  # runs the dead owner's finalizer here
        done.append(True)

    worker = threading.Thread(target=collect_while_holding_the_lock, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert done, "the finalizer waited for the lock its own thread held"
    assert len(spares) == 1
