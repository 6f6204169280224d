"""enable_fusion() routes every fusable function, also one whose module is imported after it ran: the operator
profile enabled fusion before importing the layers and timed the plain torch norms and rotary (several times
the fused kernels' time on the H200)."""

from engine.layers import fusion


def test_a_function_marked_after_enable_fusion_is_routed_too():
    fusion.enable_fusion(cpu_too=True)
    try:
        late = fusion.fusable("engine.kernels.reference:store_kvcache")(lambda *args: "plain")
        assert late.current is not late.eager
    finally:
        fusion.disable_fusion()
    assert late.current is late.eager
    early = fusion.fusable("engine.kernels.reference:store_kvcache")(lambda *args: "plain")
    assert early.current is early.eager


def test_routing_follows_cuda_only_by_default():
    import torch

    fusion.enable_fusion()
    try:
        late = fusion.fusable("engine.kernels.reference:store_kvcache")(lambda first: "plain")
        assert late(torch.zeros(1)) == "plain"  # a CPU tensor keeps the torch code
    finally:
        fusion.disable_fusion()
