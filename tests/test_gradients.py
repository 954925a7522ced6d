import pytest
import torch
from torch import nn

from hf_gaf.gradients import GradientBuffer, available_memory, parameter_units


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(dtype)


def _backward_only(model, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g).to(next(model.parameters()).dtype)
    model(x).square().sum().backward()


def _backward(model, seed):
    _backward_only(model, seed)
    return [p.grad.clone() for p in model.parameters()]


def test_capture_flattens_in_parameter_order_and_clears_grad():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=2)
    assert buffer.numel == sum(p.numel() for p in model.parameters())
    grads = _backward(model, seed=1)
    row = buffer.capture(1)
    assert torch.equal(row, torch.cat([g.reshape(-1) for g in grads]))
    assert all(p.grad is None for p in model.parameters())
    second = _backward(model, seed=2)  # starts from zero, not from the captured gradient
    buffer.capture(0)
    assert torch.equal(buffer.buffer[0], torch.cat([g.reshape(-1) for g in second]))


def test_parameters_without_grad_are_captured_as_zeros():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    buffer.buffer.fill_(7.0)
    _backward(model, seed=1)
    model[2].bias.grad = None
    row = buffer.capture(0)
    start = buffer.offsets[3]
    assert torch.equal(row[start:], torch.zeros(2))
    assert bool((row[:start] != 7.0).all())


def test_frozen_parameters_are_left_out():
    model = _model()
    model[0].weight.requires_grad_(False)
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    assert buffer.numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(p is not model[0].weight for p in buffer.params)


def test_write_back_round_trips():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    grads = _backward(model, seed=3)
    row = buffer.capture(0)
    buffer.write_back(row.clone())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_write_back_allocates_missing_grad_in_each_parameter_dtype():
    model = _model()
    model[2].to(torch.bfloat16)
    buffer = GradientBuffer(model.parameters(), num_micro=2)
    assert buffer.buffer.dtype == torch.float32  # promoted from float32 and bfloat16
    flat = torch.linspace(-1, 1, buffer.numel, dtype=torch.float64)
    buffer.write_back(flat)
    for p, start in zip(buffer.params, buffer.offsets):
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.device == p.device
        assert p.grad.shape == p.shape
        expected = flat[start : start + p.numel()].view(p.shape).float().to(p.dtype)
        assert torch.equal(p.grad, expected)


def test_install_makes_every_grad_a_view_of_the_gradient():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    buffer.gradient.fill_(5.0)  # an exchange writing its result straight into it (out=)
    buffer.install()
    pointers = [p.grad.data_ptr() for p in model.parameters()]
    assert all(bool((p.grad == 5.0).all()) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    buffer.gradient.fill_(2.5)
    buffer.install()
    assert [p.grad.data_ptr() for p in model.parameters()] == pointers  # no allocation, no copy
    assert buffer.gradient.data_ptr() == pointers[0]
    assert all(bool((p.grad == 2.5).all()) for p in model.parameters())


def test_install_leaves_unselected_parameters_without_grad():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    buffer.gradient.zero_()
    buffer.install([True, False, True, False])
    assert [p.grad is not None for p in model.parameters()] == [True, False, True, False]
    with pytest.raises(ValueError, match="4 parameters"):
        buffer.install([True])


def test_received_records_the_parameters_that_got_a_gradient_this_step():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=2)
    with buffer.capturing(0):
        model[0](torch.randn(2, 3)).sum().backward()  # only the first layer
    assert buffer.received.tolist() == [True, True, False, False]
    with buffer.capturing(1):
        _backward_only(model, seed=1)
    assert buffer.received.all()
    with buffer.capturing(0):  # a new step starts at row 0
        model[0](torch.randn(2, 3)).sum().backward()
    assert buffer.received.tolist() == [True, True, False, False]


def test_buffer_keeps_a_uniform_parameter_dtype():
    model = _model(torch.bfloat16)
    buffer = GradientBuffer(model.parameters(), num_micro=2)
    assert buffer.buffer.dtype == torch.bfloat16
    grads = _backward(model, seed=4)
    assert torch.equal(buffer.capture(0), torch.cat([g.reshape(-1) for g in grads]))


def test_bad_input_raises_clear_errors():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=2)
    with pytest.raises(IndexError, match="out of range"):
        buffer.capture(2)
    with pytest.raises(ValueError, match="flat gradient"):
        buffer.write_back(torch.zeros(buffer.numel + 1))
    with pytest.raises(ValueError, match="num_micro"):
        GradientBuffer(model.parameters(), num_micro=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        GradientBuffer(model.parameters(), num_micro=1)


def test_capturing_moves_gradients_during_backward():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=2)
    expected = _backward(model, seed=1)
    model.zero_grad(set_to_none=True)
    with buffer.capturing(1) as row:
        _backward_only(model, seed=1)
        assert all(p.grad is None for p in model.parameters())  # moved by the hooks, not at exit
    assert row.data_ptr() == buffer.buffer[1].data_ptr()
    assert torch.equal(buffer.buffer[1], torch.cat([g.reshape(-1) for g in expected]))
    assert all(p.grad is None for p in model.parameters())


def test_capturing_adds_up_backward_passes_like_grad_accumulation():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    _backward_only(model, seed=1)
    _backward_only(model, seed=2)
    accumulated = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    with buffer.capturing(0):
        _backward_only(model, seed=1)
        _backward_only(model, seed=2)
    torch.testing.assert_close(buffer.buffer[0], accumulated, rtol=0, atol=0)


def test_capturing_zeroes_parameters_without_gradient_and_keeps_grads_set_by_hand():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    buffer.buffer.fill_(7.0)
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)  # no backward reaches it
    with buffer.capturing(0) as row:
        model[2](torch.ones(1, 4)).sum().backward()
    first_layer = model[0].weight.numel() + model[0].bias.numel()
    assert torch.equal(row[: model[0].weight.numel()], torch.full((model[0].weight.numel(),), 3.0))
    assert torch.equal(row[model[0].weight.numel() : first_layer], torch.zeros(model[0].bias.numel()))
    assert bool((row[first_layer:] != 7.0).all())
    assert all(p.grad is None for p in model.parameters())


def test_capturing_removes_its_hooks_even_after_an_error():
    model = _model()
    buffer = GradientBuffer(model.parameters(), num_micro=1)
    with pytest.raises(ZeroDivisionError), buffer.capturing(0):
        _backward_only(model, seed=1)
        1 / 0
    grads = _backward(model, seed=2)  # outside the block, gradients stay in .grad
    assert all(p.grad is not None for p in model.parameters())
    with buffer.capturing(0):
        pass
    assert torch.equal(buffer.buffer[0], torch.cat([g.reshape(-1) for g in grads]))
    with pytest.raises(RuntimeError, match="nested"), buffer.capturing(0), buffer.capturing(0):
        pass


def test_parameter_units_order_parameters_unit_by_unit():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    named = list(model.named_parameters())
    whole = parameter_units(named, "model")
    assert whole.units() is None and whole.whole_model and list(whole.parameters) == [p for _, p in named]
    assert whole.plain().sizes == (26,) and whole.plain().averaged == (True,)
    tensor = parameter_units(named, "tensor")
    assert tensor.units().sizes == (12, 4, 8, 2) and not any(tensor.units().averaged) and tensor.unit_of == (0, 1, 2, 3)
    averaged = parameter_units(named, "model", averaged=["bias"])
    assert [p.numel() for p in averaged.parameters] == [12, 8, 4, 2] and averaged.names == ("0.weight", "2.weight", "0.bias", "2.bias")
    assert averaged.units().sizes == (20, 6) and averaged.units().averaged == (False, True) and averaged.unit_of == (0, 0, 1, 1)
    assert averaged.plain().averaged == (True, True) and averaged.units(sizes=[1, 2, 3, 4]).sizes == (3, 7)
    group = parameter_units(named, "group", group_by=r"\d+")
    assert group.units().sizes == (16, 10) and list(group.parameters) == [p for _, p in named]
    with pytest.raises(ValueError, match="needs gaf_group_by"):
        parameter_units(named, "group")
    with pytest.raises(ValueError, match="Unknown GAF granularity"):
        parameter_units(named, "layer")


def test_required_bytes_count_the_rows_and_the_gradient():
    model = _model()
    assert GradientBuffer.required_bytes(model.parameters(), 3) == 4 * 26 * 4
    assert available_memory(torch.device("cpu")) > 0
