"""torch.compile of whole GKA models: no graph breaks in the attention, same numbers as eager."""
import pytest
import timm
import torch

SMALL = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, depth=2)


@pytest.mark.parametrize('attn_args', [{}, {'window_2d': 1}, {'window': 9}])
@pytest.mark.parametrize('train', [False, True])
def test_no_graph_breaks(attn_args, train):
    model = timm.create_model('gka_deit_tiny_patch16_224', drop_path_rate=0.1, **attn_args, **SMALL).train(train)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 1, 28, 28))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_model_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    model = timm.create_model('gka_deit_tiny_patch16_224', window_2d=1, **SMALL)
    x = torch.randn(2, 1, 28, 28)
    compiled = torch.compile(model)
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expect = model(x)
    expect.sum().backward()
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-3, atol=1e-4)
