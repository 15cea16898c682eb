"""`recycle.Spares`: a finished request's step tensors serve the next request of the same shape."""

import gc

import torch

from hf_squeeze.recycle import Spares


class Owner:  # stands for a cache layer: what adopts tensors and is garbage collected
    pass


def adopt(spares, owner, name, tensor):
    return spares.adopt(owner, {name: tensor})[name]


def test_a_spare_serves_the_next_owner_of_its_shape_with_the_new_values():
    spares = Spares()
    first = Owner()
    kept = adopt(spares, first, (0, "keys"), torch.randn(2, 3))
    assert len(spares) == 0  # nothing handed back yet: the first owner lives
    second_values = torch.randn(2, 3)
    second = Owner()
    assert adopt(spares, second, (0, "keys"), second_values.clone()).data_ptr() != kept.data_ptr()
    address = kept.data_ptr()
    del first, kept
    gc.collect()
    assert len(spares) == 1
    third = Owner()
    got = adopt(spares, third, (0, "keys"), second_values.clone())
    assert got.data_ptr() == address and torch.equal(got, second_values)
    assert len(spares) == 0
    # another layer or another shape does not take it
    del third, got
    gc.collect()
    other = Owner()
    assert adopt(spares, other, (1, "keys"), torch.randn(2, 3)).data_ptr() != address
    assert adopt(spares, other, (0, "keys"), torch.randn(4, 3)).data_ptr() != address
    assert len(spares) == 1


def test_spares_hold_the_last_request_only_and_clear():
    spares = Spares()
    for shape in ((2, 3), (5, 3), (7, 3)):  # requests of other shapes, one after another
        owner = Owner()
        adopt(spares, owner, (0, "keys"), torch.randn(shape))
        del owner
        gc.collect()
    assert len(spares) == 1  # one spare per layer and tensor, not one per shape seen
    spares.clear()
    assert len(spares) == 0


def test_an_owner_adopting_again_hands_back_what_it_adopted_before():
    spares = Spares()
    owner = Owner()
    before = adopt(spares, owner, (0, "pins"), torch.randn(3))
    assert adopt(spares, owner, (0, "pins"), before) is before  # the same tensor: nothing changes
    assert len(spares) == 0
    after = adopt(spares, owner, (0, "pins"), torch.randn(3))  # a new request of the same owner
    assert after.data_ptr() == before.data_ptr()  # took back the memory it handed back
    assert adopt(spares, owner, (0, "length"), None) is None


def test_one_adoption_copies_what_changes_and_keeps_constant_spares_as_they_are():
    spares = Spares()
    first = Owner()
    kept = spares.adopt(first, {(0, "keys"): torch.randn(4, 2), (0, "slots"): torch.arange(4), (0, "count"): 3.0})
    addresses = {name: t.data_ptr() for name, t in kept.items() if isinstance(t, torch.Tensor)}
    del first, kept
    gc.collect()
    assert len(spares) == 2
    keys, slots = torch.randn(4, 2), torch.arange(4)
    got = spares.adopt(Owner(), {(0, "keys"): keys, (0, "slots"): slots * 0 - 1, (0, "count"): 3.0},
                       constant={(0, "slots")})
    assert {name: t.data_ptr() for name, t in got.items() if isinstance(t, torch.Tensor)} == addresses
    assert torch.equal(got[(0, "keys")], keys)  # copied
    assert torch.equal(got[(0, "slots")], slots)  # constant: the spare as it was, not the values passed
    assert got[(0, "count")] == 3.0  # not a tensor: passed through


def test_a_finalizer_run_inside_adopt_does_not_deadlock():
    """A garbage collection can start at any allocation, also inside `adopt` while it holds its lock,
    and run the finalizer of a dead owner (`_give_back`, which takes the lock) on the same thread."""
    import threading

    spares = Spares()
    dead = Owner()
    dead.cycle = dead  # collected by the cyclic collector only
    adopt(spares, dead, (0, "keys"), torch.randn(3))
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
